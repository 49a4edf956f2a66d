"""``smalltalk evaluate``: exact perplexity and bits per byte of a model directory on a data split.

    smalltalk evaluate RUN_DIR/model --data DATA_DIR --split test [--max-seqs N] [--json OUT.json]
    smalltalk evaluate RUN_DIR/dense/model --text my_docs/        # your own text, per file / domain
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ._eval_args import add_scoring_flags, score_text


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help="perplexity and bits per byte of a model on a data split",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", type=Path, help="model directory (e.g. RUN_DIR/model)")
    p.add_argument("--data", type=Path, help="prepared data directory (from `smalltalk prepare`)")
    p.add_argument("--text", nargs="+", metavar="SOURCE",
                   help="score your own text instead: files, directories, globs or hf:NAME (the model's tokenizer)")
    add_scoring_flags(p)
    p.add_argument("--json", type=Path, help="also write the result as JSON to this file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import SmallTalkError
    from ..io import atomic_write_json
    from ..train.evaluate import evaluate_model_dir

    if (args.data is None) == (args.text is None):
        raise SmallTalkError("give --data DATA_DIR (a prepared split) or --text SOURCE... (your own text), not both")
    if args.text:
        return score_text(args, args.model_dir, out=args.json)

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
