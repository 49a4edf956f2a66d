"""``smalltalk train-expert``: train expert K of a run on its shard alone (paper Alg. 1 lines 14-16).

    smalltalk train-expert --run RUN_DIR --expert K
    torchrun --nproc_per_node 4 -m smalltalk train-expert --run RUN_DIR --expert K    # DDP within expert K

Reads RUN_DIR/run_config.json and RUN_DIR/shards/expert_K/ only; writes RUN_DIR/experts/expert_K/
(checkpoints, metrics.jsonl, model/). Nothing is shared with the other experts, so the E experts can
run in any order, at the same time, or on different machines (docs/running-experts.md). Re-running
the same command resumes from the last checkpoint; a finished expert is left as it is.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train-expert", help="train one expert of a run on its data shard",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="run directory (from `smalltalk run --until shard`)")
    p.add_argument("--expert", type=int, required=True, help="expert index K in 0..E-1")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..mixture.experts import train_expert

    if args.threads:
        torch.set_num_threads(args.threads)
    summary = train_expert(args.run, args.expert, progress=False if args.no_progress else None)
    valid = summary.get("valid") or {}
    print(f"expert {args.expert}: {summary['step']} steps, {summary['tokens']:,} tokens, {summary['flops']:.3e} FLOPs"
          + (f", valid ppl on its segment {valid['ppl']:.2f}" if valid.get("ppl") else ""))
    return 0
