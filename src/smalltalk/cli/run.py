"""``smalltalk run``: the whole pipeline from raw text to a report, resumable stage by stage.

    smalltalk run --config tiny --out runs/quickstart        # the README quickstart (minutes on 2 cores)
    smalltalk run --config cpu --out runs/cpu                # the experiment of benchmarks/mixture_results.py
    smalltalk run --config my_run.yaml                       # a YAML file (see smalltalk.run.config)
    smalltalk run --config tiny --out R --until shard        # then train experts anywhere (docs/running-experts.md)
    smalltalk run --config cpu --seed-fraction 0.5           # split training: experts branch from a dense seed

Stages: prepare -> routers (EM) -> shard -> seed (split training only) -> experts -> dense -> bundle -> evaluate -> report. Each is
skipped when complete, and interrupted stages resume from their checkpoints: re-run the same command.
Writes RUN_DIR/report.md (tables) and RUN_DIR/plots/*.png.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("run", help="run the whole pipeline (prepare ... report) from a preset or YAML config",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny", help="run preset (tiny, cpu, cpu-small, cpu-medium, cpu-long, paper-335m: "
                                                    "smalltalk/presets/*.yaml) or a YAML/JSON file (default tiny)")
    p.add_argument("--out", type=Path, help="run directory (default runs/<config name>)")
    p.add_argument("--until", help="stop after this stage (prepare, routers, shard, seed, experts, dense, bundle, "
                                   "evaluate, report)")
    p.add_argument("--num-experts", type=int, help="override the config's number of experts E")
    p.add_argument("--name", help="override the run name")
    p.add_argument("--seed-fraction", type=float,
                   help="split training: the share of the budget spent on a dense seed the experts branch from "
                        "(default: the config's, 0 = pure mixture)")
    p.add_argument("--device", help="cpu, cuda or auto (default: the config's, auto)")
    p.add_argument("--expert-workers", type=int, default=1,
                   help="train experts as this many parallel processes (default 1: one after another)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--list-presets", action="store_true", help="print the run presets and exit")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..run.config import PRESETS_DIR, RUN_PRESETS, load_run_config, run_preset
    from ..run.pipeline import run_pipeline

    if args.list_presets:
        for name in RUN_PRESETS:
            print(f"{name}: {run_preset(name).describe()}")
        print(f"(one YAML file each in {PRESETS_DIR}: copy one, edit it, pass its path to --config)")
        return 0
    cfg = load_run_config(args.config, num_experts=args.num_experts, name=args.name, device=args.device,
                           seed_fraction=args.seed_fraction)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or Path("runs") / cfg.name
    run_pipeline(cfg, out, until=args.until, expert_workers=args.expert_workers,
                 progress=False if args.no_progress else None)
    return 0
