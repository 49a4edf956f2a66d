"""``smalltalk train-dense``: the dense baseline of a run at equal training tokens and FLOPs (paper Table 2).

    smalltalk train-dense --run RUN_DIR

One model with the expert architecture, the experts' number of steps, E x the expert batch, on the
whole training split, written to RUN_DIR/dense/ (resumable). Prints the experts' and the dense
model's training FLOPs side by side.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train-dense", help="train the dense baseline of a run (same tokens as all experts)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="run directory (needs its prepared data)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..mixture.dense import train_dense

    if args.threads:
        torch.set_num_threads(args.threads)
    summary = train_dense(args.run, progress=False if args.no_progress else None)
    valid = summary.get("valid") or {}
    print(f"dense: {summary['step']} steps, {summary['tokens']:,} tokens, {summary['flops']:.3e} FLOPs"
          + (f", valid ppl {valid['ppl']:.2f}" if valid.get("ppl") else ""))
    return 0
