"""The dense baseline at equal training tokens and FLOPs (paper §3.1, Table 2).

One model with the architecture of one expert, trained for the same number of steps with E times
the expert batch on the whole training split, so it sees as many tokens as all E experts together
and, FLOPs being linear in tokens for a fixed architecture, costs exactly the experts' training
FLOPs (Eq. 10 vs Eq. 15). It does not depend on routers or shards: it can train as soon as the data
is prepared, in ``<run>/dense/`` (resumable like any trainer run). With split training its first steps
are the seed's (seed.py): it starts from the seed's checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..io import read_json
from ..model.flops import training_flops
from ..data.splits import load_split
from ..train.layout import TrainerDir
from .config import RunConfig
from .layout import RunLayout, read_run_config
from .seed import start_dense_from_seed


def dense_done(layout: RunLayout) -> bool:
    return TrainerDir(layout.dense).is_done()


def flops_side_by_side(cfg: RunConfig, seq_len: int, vocab_size: int) -> tuple[int, int, str]:
    """(experts' total training FLOPs, dense training FLOPs, a one-line comparison)."""
    model = cfg.expert_model.replace(vocab_size=vocab_size, max_seq_len=seq_len)
    t, E = cfg.expert_train, cfg.num_experts
    experts = E * training_flops(model, t.max_steps, t.batch_size, seq_len - 1)
    dense_cfg = cfg.dense_train()
    dense = training_flops(model, dense_cfg.max_steps, dense_cfg.batch_size, seq_len - 1)
    line = (f"training FLOPs: {E} experts x {t.max_steps} steps x batch {t.batch_size} = {experts:.4e} | "
            f"dense {dense_cfg.max_steps} steps x batch {dense_cfg.batch_size} = {dense:.4e} "
            f"(ratio {dense / experts:.4f})")
    return experts, dense, line


def train_dense(run_dir: str | Path, *, cfg: RunConfig | None = None, progress: bool | None = None,
                log=print) -> dict[str, Any]:
    """Train (or resume, or confirm finished) the dense baseline of a run; returns its run summary."""
    from ..locks import DirLock

    layout = RunLayout(run_dir)
    cfg = cfg or read_run_config(run_dir)
    with DirLock(layout.dense, "training the dense baseline", enabled=int(os.environ.get("RANK", "0")) == 0):
        return _train_dense(layout, cfg, progress, log)


def _train_dense(layout: RunLayout, cfg: RunConfig, progress: bool | None, log) -> dict[str, Any]:
    from ..train.trainer import Trainer, model_config_for_data

    train = load_split(layout.data, "train")
    _, _, line = flops_side_by_side(cfg, train.dataset.seq_len, train.dataset.vocab_size)
    if dense_done(layout):
        log(line)
        return read_json(TrainerDir(layout.dense).summary)
    if start_dense_from_seed(layout, cfg):
        log(f"dense: starts from the seed's checkpoint (its first {cfg.split().seed_steps} steps are the seed)")
    valid = load_split(layout.data, "valid")
    model_cfg = model_config_for_data(cfg.expert_model, train)
    train_cfg = cfg.dense_train()
    trainer = Trainer(model_cfg, train_cfg, train, layout.dense, valid_data=valid, progress=progress)
    if trainer.dist.is_main:
        log(f"dense: {len(train.dataset)} training sequences, {model_cfg.describe()}; {train_cfg.describe()}"
            + (f"; resuming at step {trainer.step}" if trainer.step else ""))
        log(line)
    return trainer.train()
