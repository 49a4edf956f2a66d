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
