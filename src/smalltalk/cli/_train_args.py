"""What `train-expert` and `train-dense` share: both train one model of a run directory (resumably) with the
same flags, and print the same one-line summary."""

from __future__ import annotations

import argparse


def add_training_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def apply_training_flags(args: argparse.Namespace) -> bool | None:
    """Sets torch's CPU threads; returns the trainers' `progress` argument (None: their default)."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    return False if args.no_progress else None


def summary_line(label: str, summary: dict, ppl_label: str) -> str:
    valid = summary.get("valid") or {}
    return (f"{label}: {summary['step']} steps, {summary['tokens']:,} tokens, {summary['flops']:.3e} FLOPs"
            + (f", {ppl_label} {valid['ppl']:.2f}" if valid.get("ppl") else ""))
