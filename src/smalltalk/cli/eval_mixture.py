"""``smalltalk eval-mixture``: test perplexity of a mixture vs its dense baseline (paper §3.2, Fig. 4b, 5).

    smalltalk eval-mixture --run RUN_DIR [--max-seqs 500] [--prefix-lens 8,16,32]
    smalltalk eval-mixture --bundle B --dense DENSE_MODEL_DIR --data DATA_DIR --out results.json
    smalltalk eval-mixture runs/quickstart --text my_docs/          # your own text (the run's dense model too)
    smalltalk eval-mixture BUNDLE --text a.txt b.jsonl --dense DENSE_MODEL_DIR

Routes each test sequence by its prefix, scores it with the chosen expert, and prints the mixture's
and the dense model's perplexity, the per-expert table, and the routing-prefix sweep.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import SmallTalkError
from ._eval_args import add_scoring_flags, score_text


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("eval-mixture", help="test perplexity of a mixture bundle vs the dense baseline",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", type=Path, nargs="?", help="a run directory or a mixture bundle (or use --run / --bundle)")
    p.add_argument("--text", nargs="+", metavar="SOURCE",
                   help="score your own text instead of a prepared split: files (.txt/.md/.jsonl/.parquet), "
                        "directories, globs or hf:NAME; tokenized with the bundle's tokenizer, grouped by the "
                        "`domain` field or the file name")
    p.add_argument("--run", type=Path, help="run directory (uses its bundle/, dense/model and data/)")
    p.add_argument("--bundle", type=Path, help="mixture bundle directory")
    p.add_argument("--dense", type=Path, help="dense baseline model directory")
    p.add_argument("--data", type=Path, help="prepared data directory")
    add_scoring_flags(p)
    p.add_argument("--prefix-lens", default="", help="comma-separated extra routing prefix lengths M-hat")
    p.add_argument("--top-k", type=int, default=2, help="also report top-k soft mixing (0: off)")
    p.add_argument("--out", type=Path, help="write the full results as JSON here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..io import atomic_write_json
    from ..run.layout import RunLayout
    from ..mixture.evaluate import EvalConfig, evaluate_mixture

    if args.target is not None:
        from ..run.locate import locate

        located = locate(args.target, want=("bundle",), what="eval-mixture")
        if located.kind == "bundle":
            args.bundle = args.bundle or located.bundle
        elif args.run is None:
            args.run = located.run
    if args.text:
        return run_on_text(args)
    if args.run is not None:  # --bundle / --dense / --data replace the run's own
        layout = RunLayout(args.run)
        bundle = args.bundle or layout.bundle
        dense = args.dense or layout.dense_model
        data = args.data or layout.data
    elif args.bundle and args.dense and args.data:
        bundle, dense, data = args.bundle, args.dense, args.data
    else:
        raise SmallTalkError("give --run RUN_DIR, or all of --bundle, --dense and --data")
    if args.out is not None:  # checked before minutes of scoring, not after
        check_output_file(args.out)
    try:
        prefix_lens = [int(x) for x in args.prefix_lens.split(",") if x.strip()]
    except ValueError:
        raise SmallTalkError(f"--prefix-lens {args.prefix_lens!r}: give comma-separated integers, e.g. 8,16,32")
    cfg = EvalConfig(split=args.split, max_seqs=args.max_seqs, batch_size=args.batch_size, prefix_lens=prefix_lens,
                     top_k=args.top_k, device=args.device)
    result = evaluate_mixture(bundle, dense, data, cfg,
                              progress=lambda what: print(f"scored the {args.split} split with {what}", file=sys.stderr))
    if args.out:
        atomic_write_json(args.out, result)
    print(f"{result['num_seqs']} {args.split} sequences of {data}: mixture ppl {result['mixture']['ppl']:.3f}, dense ppl "
          f"{result['dense']['ppl']:.3f} ({lower_or_higher(result['improvement_pct'])})")
    for r in result["per_expert"]:
        if r["num_seqs"]:
            print(f"  expert {r['expert']}: {100 * r['share']:.1f}% of sequences, expert ppl {r['expert_ppl']:.3f} "
                  f"vs dense {r['dense_ppl']:.3f} ({lower_or_higher(r['improvement_pct'])})")
    for s in result["prefix_sweep"]:
        print(f"  M-hat {s['prefix_len']}: mixture ppl {s['ppl']:.3f} ({s['improvement_pct']:+.2f}%)")
    if "soft_topk" in result:
        s = result["soft_topk"]
        print(f"  top-{s['k']} soft mixing: ppl {s['ppl']:.3f} ({s['improvement_pct']:+.2f}%)")
    if not args.out:
        print(json.dumps({k: result[k] for k in ("mixture", "dense", "improvement_pct")}))
    return 0


def lower_or_higher(improvement_pct: float) -> str:
    """The improvement over dense in words: "3.10% lower", or "0.80% higher (worse)"."""
    if improvement_pct >= 0:
        return f"{improvement_pct:.2f}% lower"
    return f"{-improvement_pct:.2f}% higher (worse)"


def check_output_file(path: Path) -> None:
    if path.is_dir():
        raise SmallTalkError(f"--out {path}: is a directory; give a file path for the JSON results, e.g. {path}/results.json")
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise SmallTalkError(f"--out {path}: {parent} is a file, not a directory")


def run_on_text(args: argparse.Namespace) -> int:
    if args.data is not None:
        raise SmallTalkError("--text and --data both name what to score; give one of them")
    from ..run.locate import locate

    located = locate(args.run, want=("bundle",), what="--run") if args.run else None
    bundle = args.bundle or (located.bundle if located else None)
    if bundle is None:
        raise SmallTalkError("--text needs a mixture: give a run directory or bundle (positional, --run or --bundle)")
    dense = args.dense or (located.dense if located else None)
    if args.out is not None:
        check_output_file(args.out)
    return score_text(args, bundle, dense, args.out)
