"""`smalltalk plan`: dense, pure mixture or split training, from a law fitted to measured runs.

    smalltalk plan --params 1M --tokens 200M --experts 4
    smalltalk plan --params 42k --tokens 17M --experts 4 --corpus-tokens 29M --fit runs/a runs/b
"""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import SmallTalkError

_SUFFIX = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def count(text: str) -> int:
    """'1M', '2.5e6', '42k', '200000' -> an integer (argparse type: a one-line error names the value)."""
    s = text.strip().lower().replace("_", "").replace(",", "")
    scale = _SUFFIX.get(s[-1:], None)
    try:
        value = float(s[:-1]) * scale if scale else float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count (e.g. 1000000, 1M, 42k, 2.5e6)") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return int(round(value))


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="predict dense vs mixture vs split training for a size, budget and E",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", type=count, required=True, help="parameters of one expert (= of the dense model)")
    p.add_argument("--tokens", type=count, required=True, help="training tokens of the whole budget (dense = all experts)")
    p.add_argument("--experts", type=int, required=True, help="number of experts E")
    p.add_argument("--corpus-tokens", type=count, help="unique tokens of your corpus (warns past ~4 epochs)")
    p.add_argument("--fit", nargs="+", metavar="PATH",
                   help="refit the law on your finished run directories (and/or map_*.json results)")
    p.add_argument("--json", action="store_true", help="print the prediction as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..plan.law import fit
    from ..plan.planner import DEFAULT_LAW, default_law, recommend
    from ..plan.points import read_points

    if args.experts < 2:
        raise SmallTalkError(f"--experts {args.experts}: a mixture needs at least 2 experts")
    points = read_points(args.fit) if args.fit else None  # bad --fit paths are refused before anything else
    if points is None:
        law = default_law()
    else:
        law = fit(points, base=default_law() if DEFAULT_LAW.is_file() else None)
    rec = recommend(args.params, args.tokens, args.experts, args.corpus_tokens, law)
    for warning in rec.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.json:
        print(json.dumps({**rec.to_dict(), "law": law.to_dict()}, indent=1))
        return 0
    print(rec.line)
    splits = ", ".join(f"f={f}: {v:.2f}" for f, v in rec.split_ppl.items()) or "not measured"
    cross = rec.crossover_tokens_per_param
    cross_text = ("never (in 0.01-1e6)" if cross is None else f"{cross:.1f}")
    print(f"  tuned dense {rec.dense_ppl:.2f} | pure mixture {rec.mixture_ppl:.2f} | split {splits} | the mixture "
          f"overtakes dense above {cross_text} tokens per expert parameter (law fitted on "
          f"{len(law.fitted_on)} source(s); rmse dense {law.rmse.get('dense', 0):.3f}, mixture "
          f"{law.rmse.get('mixture', 0):.3f} nats)")
    return 0
