"""``smalltalk evaluate``: exact perplexity and bits per byte of a model directory on a data split.

    smalltalk evaluate RUN_DIR/model --data DATA_DIR --split test [--max-seqs N] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help="perplexity and bits per byte of a model on a data split",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", type=Path, help="model directory (e.g. RUN_DIR/model)")
    p.add_argument("--data", type=Path, required=True, help="prepared data directory (from `smalltalk prepare`)")
    p.add_argument("--split", default="test", help="split to evaluate (default: test)")
    p.add_argument("--max-seqs", type=int, default=0, help="evaluate an evenly spaced subset of N sequences (0: all)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--json", type=Path, help="also write the result as JSON to this file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..io import atomic_write_json
    from ..train.evaluate import evaluate_model_dir

    result = evaluate_model_dir(args.model_dir, args.data, args.split, max_seqs=args.max_seqs,
                                batch_size=args.batch_size, device=args.device)
    record = {"model_dir": str(args.model_dir), "data": str(args.data), "split": args.split, **result.to_dict()}
    bpb = f" bpb {result.bpb:.4f}" if result.bpb is not None else ""
    print(f"{args.split}: loss {result.loss:.4f} ppl {result.ppl:.3f}{bpb} "
          f"({result.num_seqs} sequences, {result.num_tokens} tokens)")
    if args.json:
        atomic_write_json(args.json, record)
    print(json.dumps(record))
    return 0
