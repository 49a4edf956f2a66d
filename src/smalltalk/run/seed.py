"""Split training's shared seed (``seed_fraction: f``; `SplitPlan` in config.py).

The seed is the dense baseline's own run stopped after its first f of its steps: same architecture, batch,
learning rate, schedule and data order on the whole (unrouted) training split, in ``<run>/seed/``. Because it
*is* the beginning of the dense run, the dense stage starts from the seed's checkpoint instead of repeating
those steps (resume is bit-exact, so the dense model is the one an uninterrupted run gives), and several f
cost one dense run plus the experts' continuations.

Each expert branches from the seed: the seed's weights and AdamW moments, then its own shard and data order,
from step `expert_start` of its own schedule. Every schedule here is a function of the fraction of the run
(warm-up and decay scale with max_steps), so the expert goes on at the learning rate the seed stopped at:
no re-warm-up to the peak (the failure of naive branching). With ``schedule: wsd`` and f inside the stable
phase, the experts share the stable phase and only their decays differ.

``seed/seed.json`` (written last) marks the seed complete and names its checkpoint and weights; an expert
records those weights in its provenance and is refused when the seed changed under it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import SmallTalkError
from ..io import atomic_write_json, read_json
from ..train import checkpoint as ckpt_lib
from ..train.layout import TrainerDir
from .config import RunConfig
from .layout import RunLayout

SEED_FILE = "seed.json"


def seed_file(layout: RunLayout) -> Path:
    return layout.seed / SEED_FILE


def seed_done(layout: RunLayout) -> bool:
    return seed_file(layout).is_file()


def read_seed(layout: RunLayout, cfg: RunConfig) -> dict[str, Any]:
    """The complete seed's record, checked against the run's split plan."""
    path = seed_file(layout)
    if not path.is_file():
        raise SmallTalkError(f"{path}: not found; this run trains its experts from a dense seed (seed_fraction "
                             f"{cfg.seed_fraction:g}): run `smalltalk run --config ... --out {layout.root} --until seed` "
                             "first")
    record = read_json(path)
    plan = cfg.split()
    if plan is None or record.get("step") != plan.seed_steps:
        raise SmallTalkError(f"{path}: the seed stopped at step {record.get('step')} but the run config's split "
                             f"plan wants {plan.seed_steps if plan else 'no seed'}; delete {layout.seed} and re-run")
    return record


def train_seed(run_dir: str | Path, *, cfg: RunConfig, progress: bool | None = None, log=print) -> dict[str, Any]:
    """Train (or resume, or confirm) the seed: the dense run's first `seed_steps` steps."""
    from ..locks import DirLock

    layout = RunLayout(run_dir)
    plan = cfg.split()
    if plan is None:
        raise SmallTalkError("run config: seed_fraction is 0; there is no seed to train")
    with DirLock(layout.seed, "training the seed", enabled=int(os.environ.get("RANK", "0")) == 0):
        if seed_done(layout):
            return read_seed(layout, cfg)
        from ..data.splits import load_split
        from ..model.io import sha256_file
        from ..train.trainer import Trainer, model_config_for_data

        train = load_split(layout.data, "train")
        model_cfg = model_config_for_data(cfg.expert_model, train)
        trainer = Trainer(model_cfg, cfg.seed_train(), train, layout.seed, valid_data=load_split(layout.data, "valid"),
                          progress=progress)
        if trainer.step > plan.seed_steps:
            raise SmallTalkError(f"{layout.seed}: its checkpoints reach step {trainer.step}, past the seed step "
                                 f"{plan.seed_steps}; delete {layout.seed} and re-run")
        if trainer.dist.is_main:
            log(f"seed: the dense run's first {plan.seed_steps} of {trainer.cfg.max_steps} steps "
                f"(f = {plan.fraction:g}); {trainer.cfg.describe()}"
                + (f"; resuming at step {trainer.step}" if trainer.step else ""))
        summary = trainer.train(until_step=plan.seed_steps)
        ckpt = TrainerDir(layout.seed).checkpoints / ckpt_lib.step_dir_name(plan.seed_steps)
        record = {"step": plan.seed_steps, "fraction": plan.fraction, "checkpoint": str(ckpt.relative_to(layout.root)),
                  "weights_sha256": sha256_file(ckpt / "model.safetensors"), "tokens": summary["tokens"],
                  "flops": summary["flops"], "model": model_cfg.to_dict(), "train": trainer.cfg.to_dict(),
                  "tokenizer_sha256": trainer.tokenizer_sha256}
        if trainer.dist.is_main:
            atomic_write_json(seed_file(layout), record)
        return record


# Train-config keys that do not change the weights a run produces.
_NOT_TRAJECTORY = {"name", "device", "compile", "eval_every", "eval_batches", "checkpoint_every", "keep_last_k",
                   "log_every"}


def _trajectory(train: dict) -> dict:
    return {k: v for k, v in train.items() if k not in _NOT_TRAJECTORY}


def seed_checkpoint(layout: RunLayout, cfg: RunConfig) -> Path:
    return layout.root / read_seed(layout, cfg)["checkpoint"]


def start_dense_from_seed(layout: RunLayout, cfg: RunConfig) -> bool:
    """Give a dense run that has not started the seed's checkpoint and metrics (its own first steps).
    Returns whether it did."""
    import shutil

    dense = TrainerDir(layout.dense)
    if cfg.split() is None or not seed_done(layout) or ckpt_lib.latest_checkpoint(dense.checkpoints) is not None:
        return False
    if _trajectory(read_seed(layout, cfg)["train"]) != _trajectory(cfg.seed_train().to_dict()):
        return False  # the dense settings changed since the seed: it trains on its own
    ckpt = seed_checkpoint(layout, cfg)
    dense.checkpoints.mkdir(parents=True, exist_ok=True)
    staging = dense.checkpoints / f".{ckpt.name}.from-seed.partial"  # removed by the trainer if we are killed
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(ckpt, staging)
    seed_metrics = TrainerDir(layout.seed).metrics
    if seed_metrics.is_file():
        shutil.copyfile(seed_metrics, dense.metrics)
    os.replace(staging, dense.checkpoints / ckpt.name)
    return True


def check_seed_for_expert(layout: RunLayout, cfg: RunConfig, model_cfg_dict: dict, tokenizer_sha256: str | None) -> dict:
    """The seed record, refused when its architecture or tokenizer is not the experts'."""
    record = read_seed(layout, cfg)
    path = seed_file(layout)
    seed_model = {k: v for k, v in record.get("model", {}).items() if k != "name"}
    mine = {k: v for k, v in model_cfg_dict.items() if k != "name"}
    if seed_model != mine:
        diff = sorted(k for k in set(seed_model) | set(mine) if seed_model.get(k) != mine.get(k))
        raise SmallTalkError(f"{path}: the seed's architecture differs from the experts' ({', '.join(diff)}: "
                             f"{[seed_model.get(k) for k in diff]} vs {[mine.get(k) for k in diff]}); delete "
                             f"{layout.seed} and re-run the seed stage")
    if record.get("tokenizer_sha256") != tokenizer_sha256:
        raise SmallTalkError(f"{path}: the seed was trained with tokenizer sha256 "
                             f"{str(record.get('tokenizer_sha256'))[:12]}, the experts' data uses "
                             f"{str(tokenizer_sha256)[:12]}; delete {layout.seed} and re-run the seed stage")
    return record


def branch_from_seed(trainer, layout: RunLayout, cfg: RunConfig) -> None:
    """Start a fresh expert trainer from the seed: its weights and AdamW state, at the plan's expert step. The
    expert's own tokens and FLOPs count from there (the seed's are counted once, as the seed's)."""
    plan = cfg.split()
    ckpt = seed_checkpoint(layout, cfg)
    ckpt_lib.read_checkpoint_meta(ckpt)  # verifies the checksums
    ckpt_lib.load_checkpoint_weights(ckpt, trainer.model, trainer.optimizer, trainer.device)
    trainer.step = plan.expert_start
