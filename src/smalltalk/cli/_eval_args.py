"""The flags every scoring command shares (`evaluate`, `eval-mixture`, `analyze`): which split, how many of
its sequences, how many per forward pass, on which device; same names and defaults everywhere."""

from __future__ import annotations

import argparse


def add_scoring_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split", default="test", help="split to evaluate on (default: %(default)s)")
    p.add_argument("--max-seqs", type=int, default=0,
                   help="evaluate an evenly spaced subset of this many sequences (default: 0 = all)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")


def score_text(args: argparse.Namespace, model, dense=None, out=None) -> int:
    """`--text` of `evaluate` and `eval-mixture`: score the files, print the breakdown, save it to `out`."""
    from ..io import atomic_write_json
    from ..mixture.text_eval import describe, evaluate_text

    result = evaluate_text(model, args.text, dense=dense, batch_size=args.batch_size, max_seqs=args.max_seqs,
                           device=args.device)
    for line in describe(result):
        print(line)
    if out:
        atomic_write_json(out, result)
    return 0
