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

from ._train_args import add_training_flags, apply_training_flags, summary_line


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train-expert", help="train one expert of a run on its data shard",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="run directory (from `smalltalk run --until shard`)")
    p.add_argument("--expert", type=int, required=True, help="expert index K in 0..E-1")
    add_training_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..run.experts import train_expert

    summary = train_expert(args.run, args.expert, progress=apply_training_flags(args))
    print(summary_line(f"expert {args.expert}", summary, "valid ppl on its segment"))
    return 0
