"""``smalltalk train-routers``: train E prefix routers by EM with balanced assignments (paper Alg. 1 lines 1-10).

    smalltalk train-routers --data DATA_DIR --out RUN_DIR --num-experts 4 --prefix-len 64 [--preset cpu ...]
    torchrun --nproc_per_node 2 -m smalltalk train-routers ...     # routers split over 2 workers

Writes RUN_DIR/routers/ (router_{e}/ model directories, manifest.json, em_log.jsonl, em_plot.png,
comm.json). Re-running the same command resumes after the last completed EM iteration.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import SmallTalkError

# Flag -> RouterEMConfig field (plain-value overrides of the preset).
_OVERRIDES = {
    "num_experts": int, "prefix_len": int, "iterations": int, "steps_per_iteration": int, "seqs_per_iteration": int,
    "router_preset": str, "batch_size": int, "lr": float, "warmup_steps": int, "weight_decay": float,
    "grad_clip": float, "seed": int, "heldout_seqs": int, "score_batch_size": int, "score_dtype": str, "device": str,
}
_HELP = {
    "num_experts": "E: number of routers / experts (>= 2)",
    "prefix_len": "M: prefix tokens routers train on and score (paper: 256)",
    "iterations": "T: EM iterations",
    "steps_per_iteration": "optimizer steps per router per EM iteration",
    "seqs_per_iteration": "N: new sequences scored and assigned per iteration (default: steps x batch x E)",
    "router_preset": "model preset of the routers (e.g. tiny, cpu-router, router-4.4m)",
    "batch_size": "sequences per router optimizer step",
    "lr": "constant learning rate after warm-up",
    "warmup_steps": "linear warm-up steps (once, at the start)",
    "weight_decay": "AdamW weight decay",
    "grad_clip": "max gradient norm (0 disables)",
    "seed": "seed for sampling, the initial assignment and router inits",
    "heldout_seqs": "valid sequences used to log held-out NLL and routing changes (0: none)",
    "score_batch_size": "sequences per batched scoring pass",
    "score_dtype": "precision of the exchanged scores (float32 or float16)",
    "device": "auto, cpu or cuda",
}


def add_parser(subparsers) -> None:
    from ..routing.config import ROUTER_EM_PRESETS, SCORE_DTYPES

    p = subparsers.add_parser("train-routers", help="train E prefix routers by EM with balanced assignments",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, help="prepared data directory (from `smalltalk prepare`)")
    p.add_argument("--out", type=Path, help="run directory; routers are written to OUT/routers/")
    p.add_argument("--preset", default="cpu", choices=sorted(ROUTER_EM_PRESETS), help="router EM preset")
    p.add_argument("--threads", type=int, help="torch CPU threads per worker (default: torch's choice)")
    p.add_argument("--list-presets", action="store_true", help="print the router EM presets and exit")
    for name, kind in _OVERRIDES.items():
        extra = {"choices": SCORE_DTYPES} if name == "score_dtype" else {}
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=_HELP[name], **extra)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..routing.config import ROUTER_EM_PRESETS, router_em_preset

    if args.list_presets:
        for cfg in ROUTER_EM_PRESETS.values():
            print(cfg.describe())
        return 0
    if args.data is None or args.out is None:
        raise SmallTalkError("--data and --out are required (or use --list-presets)")
    import torch

    from ..routing.distributed import init_workers, shutdown_workers
    from ..routing.em import train_routers
    from ..routing.routers_dir import routers_dir

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = router_em_preset(args.preset, **{k: getattr(args, k) for k in _OVERRIDES})
    workers = init_workers(cfg.device)
    try:
        manifest = train_routers(args.data, args.out, cfg, workers=workers)
    finally:
        shutdown_workers(workers)
    if workers.is_main:
        final = manifest["final"]
        print(f"routers: {routers_dir(args.out)} (E={manifest['num_experts']}, M={manifest['prefix_len']}, "
              f"{manifest['iterations_completed']} iterations); segments {final['segment_sizes']}, "
              f"held-out NLL {[round(x, 3) for x in final['heldout_nll'] or []]}, "
              f"specialised {final['specialised']}")
    return 0
