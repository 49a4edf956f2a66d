"""``smalltalk grow BUNDLE --data NEW_DATA --out NEW_BUNDLE``: add an expert for new data to a mixture.

    smalltalk grow runs/x --data my_new_domain/ --out runs/x/bundle-grown
    smalltalk grow runs/x/bundle --data new/ --out grown --branch-from 2 --expert-steps 300

Trains one new router (on the new data's prefixes; with --new-experts K, K routers by EM among themselves)
and one new expert each (from scratch, or branched from an
existing expert), then writes a bundle of E + 1 experts; the original bundle and its models are not
modified. See `smalltalk.mixture.grow` for what the new data must look like and how routing treats it.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("grow", help="add an expert for new data to a mixture bundle",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", type=Path, help="mixture bundle, or a run directory holding bundle/")
    p.add_argument("--data", nargs="+", required=True, metavar="SOURCE",
                   help="new text (files, folders, globs, hf:NAME) or a directory prepared with the bundle's tokenizer")
    p.add_argument("--out", type=Path, required=True, help="the new bundle directory (must not exist)")
    p.add_argument("--branch-from", type=_expert_or_nearest, metavar="K|nearest",
                   help="start the new expert from expert K, or from the one whose router claims most of the new "
                        "data (default: from scratch)")
    p.add_argument("--new-experts", type=int, default=1, metavar="K",
                   help="add K experts: K new routers trained by EM among themselves on the new data (default 1)")
    p.add_argument("--router-steps", type=int, default=0, help="new router's steps (default: as the old routers)")
    p.add_argument("--expert-steps", type=int, default=0, help="new expert's steps (default: as the old experts)")
    p.add_argument("--expert-batch-size", type=int, default=0, help="new expert's batch (default: as the old ones)")
    p.add_argument("--max-bytes-per-file", type=int, help="read only this much of each new file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=run)


def _expert_or_nearest(value: str) -> int | str:
    if value == "nearest":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: give an expert index or 'nearest'") from None


def run(args: argparse.Namespace) -> int:
    from ..mixture.grow import GrowConfig, grow_bundle
    from ..run.locate import locate

    bundle = locate(args.bundle, want=("bundle",), what="grow").bundle
    cfg = GrowConfig(router_steps=args.router_steps, expert_steps=args.expert_steps,
                     expert_batch_size=args.expert_batch_size, branch_from=args.branch_from,
                     new_experts=args.new_experts, seed=args.seed,
                     max_bytes_per_file=args.max_bytes_per_file, device=args.device)
    result = grow_bundle(bundle, args.data, args.out, cfg)
    flops = result["training_flops"]
    routing = result["new_data_routing"]
    parent = "" if result["branch_from"] in (None, []) else f", branched from expert {result['branch_from']}"
    added = result["added_experts"]
    which = f"expert {added[0]} is new" if len(added) == 1 else f"experts {added[0]}-{added[-1]} are new"
    print(f"wrote {result['bundle']}: {result['num_experts']} experts ({which}{parent}, "
          f"{result['new_train_seqs']} training sequences; {100 * routing['new_expert_share']:.1f}% of the new "
          f"data's {routing['split']} split goes to the new expert{'s' if len(added) > 1 else ''}); growing cost {flops['grow']:.3e} training FLOPs, "
          f"{100 * flops['grow_over_retrain']:.1f}% of retraining {result['num_experts']} experts from scratch")
    return 0
