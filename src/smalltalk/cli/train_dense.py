"""``smalltalk train-dense``: the dense baseline of a run at equal training tokens and FLOPs (paper Table 2).

    smalltalk train-dense --run RUN_DIR

One model with the expert architecture, the experts' number of steps, E x the expert batch, on the
whole training split, written to RUN_DIR/dense/ (resumable). Prints the experts' and the dense
model's training FLOPs side by side.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ._train_args import add_training_flags, apply_training_flags, summary_line


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train-dense", help="train the dense baseline of a run (same tokens as all experts)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="run directory (needs its prepared data)")
    add_training_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..run.dense import train_dense

    summary = train_dense(args.run, progress=apply_training_flags(args))
    print(summary_line("dense", summary, "valid ppl"))
    return 0
