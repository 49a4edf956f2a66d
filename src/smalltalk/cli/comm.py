"""`smalltalk comm`: App. A.4 communication estimate, beside the bytes a run measured."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import SmallTalkError
from ..routing import comm

# Settings a run's comm.json may carry; used when the flag is not given.
_RUN_KEYS = ("num_experts", "seq_len", "tokens_between_comms", "bytes_per_score", "world_size", "num_comms")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("comm", help="communication estimate of the paper's App. A.4 (and a run's measured bytes)",
                       description="Bytes each router exchanges (App. A.4) vs data-parallel training. Defaults "
                                   "are the paper's settings; with --run, settings recorded in the run's "
                                   "routers/comm.json fill in flags you did not give.")
    d = comm.PAPER_SETTINGS
    p.add_argument("--experts", type=int, help=f"number of routers/experts E (default: {d['num_experts']})")
    p.add_argument("--seq-len", type=int, help=f"sequence length S (default: {d['seq_len']})")
    p.add_argument("--tokens-between-comms", type=float,
                   help=f"training tokens per router between exchanges T (default: {d['tokens_between_comms']:.0f})")
    p.add_argument("--sequences-per-comm", type=int,
                   help="alternative to --tokens-between-comms: sequences scored per exchange (T = N * S / E)")
    p.add_argument("--router-steps", type=int, default=d["router_steps"], help="router steps (default: %(default)s)")
    p.add_argument("--router-batch-size", type=int, default=d["router_batch_size"],
                   help="router batch B_r (default: %(default)s)")
    p.add_argument("--num-comms", type=int, help="number of exchanges (default: N_steps_router * S * B_r / T, rounded up)")
    p.add_argument("--bytes-per-score", type=int, help="2 for float16, 4 for float32 (default: 2)")
    p.add_argument("--world-size", type=int, help="workers sharing the scores: adds the exact all-gather volume")
    p.add_argument("--expert-batch-size", type=int, default=d["expert_batch_size"],
                   help="expert batch B for Eq. 17 (default: %(default)s)")
    p.add_argument("--message-bytes", type=float, default=d["message_bytes"],
                   help="message size K for Eq. 17 (default: 2^31-1)")
    p.add_argument("--dense-params", type=float, default=d["dense_params"],
                   help="parameters W of the data-parallel comparison (default: %(default).3g)")
    p.add_argument("--run", metavar="RUN_DIR", help="also print the bytes measured in RUN_DIR/routers/comm.json")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=run)


def _mb(x: float | None) -> str:
    return "n/a" if x is None else f"{x / 1e6:,.3f} MB"


def run(args: argparse.Namespace) -> int:
    if args.run and not Path(args.run).is_dir():
        raise SmallTalkError(f"--run {args.run}: no such run directory; pass the directory a pipeline run wrote")
    measured = comm.read_measured_comm(args.run) if args.run else None
    recorded = {k: measured["file"][k] for k in _RUN_KEYS if measured and measured["file"].get(k) is not None}

    def pick(flag, key):
        # The flag wins, then what the run recorded, then the paper's setting.
        return flag if flag is not None else recorded.get(key, comm.PAPER_SETTINGS.get(key))

    E, S = pick(args.experts, "num_experts"), pick(args.seq_len, "seq_len")
    if args.tokens_between_comms is None and args.sequences_per_comm is not None:
        T = comm.tokens_between_comms_for(args.sequences_per_comm, E, S)
    else:
        T = pick(args.tokens_between_comms, "tokens_between_comms")
    world_size = pick(args.world_size, "world_size")
    if world_size is None and measured:
        world_size = len(measured["per_rank"])
    est = comm.comm_estimate(
        E, S, T, pick(args.bytes_per_score, "bytes_per_score"), num_comms=pick(args.num_comms, "num_comms"),
        router_steps=args.router_steps, router_batch_size=args.router_batch_size, world_size=world_size,
        expert_batch_size=args.expert_batch_size, message_bytes=args.message_bytes, dense_params=args.dense_params,
    )
    if args.json:
        out = {"estimate": est}
        if args.run:
            out["measured"] = measured and {"path": measured["path"], "per_rank": measured["per_rank"]}
        print(json.dumps(out, indent=1))
        return 0

    print(f"App. A.4 estimate: E={E} S={S} T={T:,.0f} tokens/router between exchanges, "
          f"{est['bytes_per_score']} bytes/score")
    print(f"  sequences per exchange (T*E/S)         {est['sequences_per_comm']:,.0f}")
    if est["num_comms_exact"] is not None:
        print(f"  exchanges N_comm (N_r*S*B_r/T)         {est['num_comms_exact']:.1f} -> {est['num_comms']}")
    else:
        print(f"  exchanges                              {est['num_comms']}")
    print(f"  paper: bytes per router per exchange   {_mb(est['paper_bytes_per_router_per_comm'])}")
    print(f"  paper: bytes per router, all exchanges {_mb(est['paper_bytes_per_router_total'])}")
    if world_size:
        print(f"  all-gather over {world_size} workers, per worker each way, per exchange "
              f"{_mb(est['allgather_bytes_per_worker_per_comm'])}, total {_mb(est['allgather_bytes_per_worker_total'])}")
    print(f"  expert phase (Eq. 17): one {args.message_bytes:,.0f}-byte message every "
          f"{est['expert_steps_between_comms']:,.0f} expert steps (B={args.expert_batch_size})")
    print(f"data-parallel comparison: W={args.dense_params:.3g} params -> "
          f"{est['data_parallel_bytes_per_step'] / 1e9:,.2f} GB per node per step")
    if args.run:
        if measured is None:
            print(f"measured: no {args.run}/routers/comm.json (written by `smalltalk train-routers`); "
                  "showing the estimate only")
        else:
            print(f"measured ({measured['path']}):")
            for row in measured["per_rank"]:
                print(f"  rank {row['rank']}: sent {_mb(row['bytes_sent'])}, received {_mb(row['bytes_received'])}")
    return 0
