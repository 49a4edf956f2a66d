"""``smalltalk train``: train one language model on a prepared data directory (resumes automatically).

    smalltalk train --data DATA_DIR --model-preset tiny --train-preset tiny --out RUN_DIR [--max-steps N ...]
    smalltalk train --list-presets
    torchrun --nproc_per_node 2 -m smalltalk train ...        # data parallel
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..errors import SmallTalkError

# Flag -> TrainConfig field, for the overrides that are plain values.
_TRAIN_OVERRIDES = {
    "max_steps": int, "batch_size": int, "grad_accum": int, "lr": float, "min_lr_ratio": float, "warmup_steps": int,
    "schedule": str, "weight_decay": float, "grad_clip": float, "eval_every": int, "eval_batches": int,
    "checkpoint_every": int, "keep_last_k": int, "log_every": int, "seed": int, "device": str, "precision": str,
    "loss_prefix_len": int,
}


def add_parser(subparsers) -> None:
    from ..model.config import PRESETS
    from ..train.config import PRECISIONS, SCHEDULES, TRAIN_PRESETS

    p = subparsers.add_parser("train", help="train a language model (router, expert or dense) on token shards",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, help="prepared data directory (from `smalltalk prepare`)")
    p.add_argument("--out", type=Path, help="run directory: checkpoints/, metrics.jsonl, model/")
    p.add_argument("--model-preset", default="tiny", choices=sorted(PRESETS), help="model size preset")
    p.add_argument("--train-preset", default="tiny", choices=sorted(TRAIN_PRESETS), help="training preset")
    p.add_argument("--max-seq-len", type=int, help="model context (default: the data's sequence length)")
    p.add_argument("--train-split", default="train", help="split to train on")
    p.add_argument("--valid-split", default="valid", help="split for periodic validation ('' to disable)")
    p.add_argument("--indices", type=Path, help=".npy file of training sequence indices (default: the whole split)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--compile", action="store_true", default=None, help="wrap the model in torch.compile")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--list-presets", action="store_true", help="print model and training presets and exit")
    for name, kind in _TRAIN_OVERRIDES.items():
        flag = "--" + name.replace("_", "-")
        extra = {}
        if name == "schedule":
            extra["choices"] = SCHEDULES
        elif name == "precision":
            extra["choices"] = PRECISIONS
        p.add_argument(flag, type=kind, default=None, help=f"override the preset's {name}", **extra)
    p.set_defaults(func=run)


def list_presets() -> str:
    from ..model.config import PRESETS
    from ..train.config import TRAIN_PRESETS

    lines = ["model presets (parameters with the preset's vocabulary; training uses the data's):"]
    lines += [f"  {cfg.describe()}" for cfg in PRESETS.values()]
    lines.append("train presets:")
    lines += [f"  {cfg.describe()}" for cfg in TRAIN_PRESETS.values()]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.list_presets:
        print(list_presets())
        return 0
    if args.data is None or args.out is None:
        raise SmallTalkError("--data and --out are required (or use --list-presets)")

    import numpy as np
    import torch

    from ..locks import DirLock, ensure_dir
    from ..model.config import preset
    from ..train.config import train_preset
    from ..train.distributed import shutdown
    from ..data.splits import load_split
    from ..train.trainer import Trainer

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {name: getattr(args, name) for name in _TRAIN_OVERRIDES}
    overrides["compile"] = args.compile
    train_cfg = train_preset(args.train_preset, **overrides)
    train = load_split(args.data, args.train_split)
    valid = load_split(args.data, args.valid_split) if args.valid_split else None
    model_cfg = preset(args.model_preset, vocab_size=train.dataset.vocab_size,
                       max_seq_len=args.max_seq_len or train.dataset.seq_len)
    indices = None
    if args.indices is not None:
        if not args.indices.is_file():
            raise SmallTalkError(f"{args.indices}: indices file not found")
        try:
            indices = np.load(args.indices, allow_pickle=False)
        except ValueError as e:
            raise SmallTalkError(f"{args.indices}: not a .npy array of sequence indices ({e})") from None
    ensure_dir(args.out)
    try:
        # One process (rank 0 of a torchrun job) holds the run directory; a second `train --out` is refused.
        with DirLock(args.out, "smalltalk train", enabled=int(os.environ.get("RANK", "0")) == 0):
            trainer = Trainer(model_cfg, train_cfg, train, args.out, valid_data=valid, indices=indices,
                              progress=False if args.no_progress else None)
            if trainer.dist.is_main:
                print(f"model  {model_cfg.describe()}\ntrain  {train_cfg.describe()}\nrun    {args.out}"
                      f"{' (resuming at step %d)' % trainer.step if trainer.step else ''}")
            summary = trainer.train()
    finally:
        shutdown()
    if trainer.dist.is_main:
        valid_txt = ""
        if summary["valid"]:
            v = summary["valid"]
            valid_txt = f", valid loss {v['loss']:.4f} ppl {v['ppl']:.2f}" + (
                f" bpb {v['bpb']:.4f}" if v.get("bpb") is not None else "")
        loss = f"{summary['loss']:.4f}" if summary["loss"] is not None else "n/a"
        print(f"done: step {summary['step']}, train loss {loss}{valid_txt}; model in {Path(args.out) / 'model'}")
    return 0
