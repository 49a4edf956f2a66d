"""``smalltalk shard``: split a prepared dataset into E expert datasets with trained routers (Alg. 1 lines 12-13).

    smalltalk shard --data DATA_DIR --routers RUN_DIR/routers --out SHARDS_DIR
    torchrun --nproc_per_node 2 -m smalltalk shard ...        # chunks split over 2 workers

Each chunk (a seeded random sample of the split) is scored by all routers on its prefix and
balanced-assigned; expert e's sequences go to SHARDS_DIR/expert_{e}/ (a prepared-data directory:
`smalltalk train --data` reads it).
Re-running the same command resumes with the chunks not yet written.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import SmallTalkError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("shard", help="route a dataset's sequences into E expert datasets with trained routers",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, help="prepared data directory (from `smalltalk prepare`)")
    p.add_argument("--routers", type=Path, help="routers directory written by `smalltalk train-routers` (RUN/routers)")
    p.add_argument("--out", type=Path, help="output directory for the expert datasets")
    p.add_argument("--chunk-size", type=int, help="sequences balanced-assigned together (default: the routers' "
                                                  "sequences per EM iteration)")
    p.add_argument("--seed", type=int, help="which sequences share a chunk (default: the routers' EM seed)")
    p.add_argument("--splits", default="train", help="comma-separated splits to shard (default: train)")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per batched scoring pass")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--threads", type=int, help="torch CPU threads per worker (default: torch's choice)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.data is None or args.routers is None or args.out is None:
        raise SmallTalkError("--data, --routers and --out are required")
    if args.chunk_size is not None and args.chunk_size < 1:
        raise SmallTalkError(f"--chunk-size {args.chunk_size} must be a positive integer")
    if args.batch_size < 1:
        raise SmallTalkError(f"--batch-size {args.batch_size} must be a positive integer")
    import torch

    from ..routing.distributed import init_workers, shutdown_workers
    from ..routing.sharding import shard_dataset

    if args.threads:
        torch.set_num_threads(args.threads)
    splits = [s for s in args.splits.split(",") if s]
    workers = init_workers(args.device)
    try:
        manifest = shard_dataset(args.data, args.routers, args.out, chunk_size=args.chunk_size, splits=splits,
                                 seed=args.seed, batch_size=args.batch_size, workers=workers)
    finally:
        shutdown_workers(workers)
    if workers.is_main:
        for split, info in manifest["splits"].items():
            print(f"shard {split}: {info['num_seqs']} sequences -> experts {info['counts']} in {args.out}")
    return 0
