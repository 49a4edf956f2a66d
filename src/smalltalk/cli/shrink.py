"""``smalltalk shrink BUNDLE --drop K --out NEW_BUNDLE``: remove expert K (and its router) from a mixture.

    smalltalk shrink runs/x/bundle --drop 2 --out runs/x/bundle-without-2
    smalltalk shrink runs/x --drop 2 --out runs/x/bundle-without-2 --cost     # and what the opt-out costs

Nothing of the original bundle changes and the kept models keep their files' hashes; the dropped expert's
traffic falls to the remaining routers' argmax. With a run directory, ``--cost`` scores the run's test split
before and after: perplexity on the dropped expert's former segment and on everything else.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import SmallTalkError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("shrink", help="remove experts from a mixture bundle (data opt-out)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", type=Path, help="mixture bundle, or a run directory holding bundle/")
    p.add_argument("--drop", required=True, help="expert index(es) to remove, comma-separated")
    p.add_argument("--out", type=Path, required=True, help="the new bundle directory (must not exist)")
    p.add_argument("--cost", action="store_true", help="also score the run's test split before and after")
    p.add_argument("--dense", type=Path, help="dense model for --cost (default RUN/dense/model)")
    p.add_argument("--data", type=Path, help="prepared data for --cost (default RUN/data)")
    p.add_argument("--max-seqs", type=int, default=0, help="--cost on this many test sequences (default all)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..mixture.shrink import opt_out_cost, shrink_bundle
    from ..run.locate import locate

    try:
        drop = [int(k) for k in args.drop.split(",") if k.strip()]
    except ValueError:
        raise SmallTalkError(f"--drop {args.drop!r}: give expert indices, e.g. 2 or 1,3") from None
    located = locate(args.bundle, want=("bundle",), what="shrink")
    bundle = located.bundle
    new = shrink_bundle(bundle, drop, args.out)
    print(f"wrote {args.out}: {new.num_experts} experts (dropped {drop} of {bundle})")
    if args.cost:
        dense = args.dense or located.dense
        data = args.data or located.data
        if dense is None or data is None:
            raise SmallTalkError("--cost needs a run directory, or --dense and --data")
        cost = opt_out_cost(bundle, drop, dense, data, max_seqs=args.max_seqs, device=args.device)
        seg, rest = cost["dropped_segment"], cost["rest"]
        if seg["num_seqs"]:
            print(f"dropped segment ({seg['num_seqs']} sequences): ppl {seg['ppl_before']:.3f} -> {seg['ppl_after']:.3f} "
                  f"(dense {seg['dense_ppl']:.3f})")
        print(f"everything else ({rest['num_seqs']} sequences): ppl {rest['ppl_before']:.3f} -> {rest['ppl_after']:.3f}")
        atomic = args.out / "opt_out_cost.json"
        atomic.write_text(json.dumps(cost, indent=1))
    return 0
