"""``smalltalk analyze``: routing analyses and baselines of a finished run (paper §3.4, App. C).

    smalltalk analyze prefix-length  --run RUN [--compare M32=RUN_M32] [--prefix-lens 8,16,32,64]
    smalltalk analyze router-size    --run RUN --compare small=RUN_SMALL --compare self=RUN_SELF
    smalltalk analyze tfidf          --run RUN [--prefix-lens 32,64]      (trains E experts)
    smalltalk analyze random-shards  --run RUN [--prefix-lens 32,64]      (trains E experts)
    smalltalk analyze specialisation --run RUN

Each writes RUN/analysis/<name>/ (result.json, table.md, <name>.png, section.md) and re-renders RUN/report.md
with every analysis section.
The baselines train their experts like the run's own (same budget), resumably, in
RUN/analysis/<name>/run/; re-running the same command resumes or reuses them.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from ..errors import SmallTalkError
from ._eval_args import add_scoring_flags

ANALYSES = ("prefix-length", "router-size", "tfidf", "random-shards", "specialisation")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("analyze", help="routing analyses and baselines of a run (prefix length, router size, "
                                              "TF-IDF, random shards, specialisation)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("analysis", choices=ANALYSES, help="which analysis to run")
    p.add_argument("--run", type=Path, required=True, help="run directory written by `smalltalk run`")
    p.add_argument("--compare", action="append", default=[], metavar="[LABEL=]RUN_DIR",
                   help="another run to put beside --run (prefix-length: e.g. a partition trained with M=32; "
                        "router-size: runs with other router sizes); repeatable")
    p.add_argument("--prefix-lens", help="comma-separated routing prefix lengths M-hat (default: 8,16,32,... up to "
                                         "the routers' context, plus M)")
    add_scoring_flags(p)
    p.add_argument("--seed", type=int, help="tfidf / random-shards: seed of the partition (default: the run's)")
    p.add_argument("--fit-prefix-len", type=int,
                   help="tfidf: tokens of each training sequence to cluster (default: the run's M)")
    p.add_argument("--svd-dim", type=int, help="tfidf: SVD dimensions (default: 100)")
    p.add_argument("--no-train", action="store_true",
                   help="tfidf / random-shards: only evaluate experts that are already trained")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(func=run)


def parse_prefix_lens(text: str | None) -> list[int]:
    if not text:
        return []
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SmallTalkError(f"--prefix-lens {text!r}: give comma-separated integers, e.g. 8,16,32") from None


def parse_compare(items: list[str]) -> list[tuple[str | None, Path]]:
    out = []
    for item in items:
        label, sep, path = item.partition("=")
        if not sep:
            label, path = None, item
        if not path:
            raise SmallTalkError(f"--compare {item!r}: expected [LABEL=]RUN_DIR")
        out.append((label or None, Path(path)))
    return out


def run(args: argparse.Namespace) -> int:
    import torch

    from ..analysis.output import analysis_dir

    if args.threads:
        torch.set_num_threads(args.threads)
    for module, extra in (("sklearn", "analysis"), ("scipy", "analysis"), ("matplotlib", "plot")):
        if importlib.util.find_spec(module) is None:
            raise SmallTalkError(f"`smalltalk analyze` needs {module}: pip install 'smalltalk[analysis,plot]'")
    if args.max_seqs < 0 or args.batch_size < 1:
        raise SmallTalkError(f"--max-seqs {args.max_seqs} must be >= 0 and --batch-size {args.batch_size} >= 1")
    lens = parse_prefix_lens(args.prefix_lens)
    compare = parse_compare(args.compare)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    common = dict(split=args.split, max_seqs=args.max_seqs, batch_size=args.batch_size, device=args.device)
    if compare and args.analysis not in ("prefix-length", "router-size"):
        raise SmallTalkError(f"--compare is for prefix-length and router-size, not {args.analysis}")
    if args.analysis == "prefix-length":
        from ..analysis.prefix_length import analyze_prefix_length
        from ..analysis.runs import PrefixSettings

        analyze_prefix_length(args.run, PrefixSettings(prefix_lens=lens, **common), compare, log=log)
    elif args.analysis == "router-size":
        from ..analysis.router_size import analyze_router_size
        from ..analysis.runs import ScoreSettings

        analyze_router_size(args.run, compare, ScoreSettings(**common), log=log)
    elif args.analysis == "tfidf":
        from ..analysis.tfidf_baseline import TfidfBaselineConfig, analyze_tfidf

        overrides = {"svd_dim": args.svd_dim} if args.svd_dim else {}
        analyze_tfidf(args.run, TfidfBaselineConfig(prefix_lens=lens, seed=args.seed, train=not args.no_train,
                                                     fit_prefix_len=args.fit_prefix_len, tfidf=overrides, **common),
                      log=log)
    elif args.analysis == "random-shards":
        from ..analysis.baselines import BaselineConfig
        from ..analysis.random_shards import analyze_random_shards

        analyze_random_shards(args.run, BaselineConfig(prefix_lens=lens, seed=args.seed, train=not args.no_train,
                                                       **common), log=log)
    else:
        from ..analysis.runs import ScoreSettings
        from ..analysis.specialisation import analyze_specialisation

        analyze_specialisation(args.run, ScoreSettings(**common), log=log)
    from ..run.report import refresh_report

    out = analysis_dir(args.run, args.analysis)
    print((out / "table.md").read_text(encoding="utf-8").rstrip())
    print(f"\nwrote {out}/ (result.json, table.md, {args.analysis}.png, section.md)")
    report = refresh_report(args.run)
    if report is not None:
        print(f"updated {report} (its analyses sections)")
    return 0
