"""AdamW with decay only on matrices, the two learning-rate schedules of the paper (App. A.1) and WSD.

The schedule is a pure function of the step, so resuming needs only the step number: no
scheduler object whose hidden state could drift from the optimizer's.
"""

from __future__ import annotations

import math

import torch

from .config import TrainConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: matrices (linear weights, embeddings) decay; biases and LayerNorm parameters do not.

    Decaying a LayerNorm gain pulls it towards 0, not towards the identity 1, and biases have no
    scale to regularise, hence the split (as in GPT-2 / nanoGPT).
    """
    decay, no_decay = [], []
    for p in model.parameters():  # shared (tied) parameters are yielded once
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW (paper: betas 0.9 / 0.99, weight decay 0.1) using the fused kernel where this torch has one."""
    kwargs = dict(lr=lr_at(0, cfg), betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    groups = param_groups(model, cfg.weight_decay)
    # The fused single-kernel step exists for CUDA and (torch >= 2.4) CPU; it is deterministic and
    # several times faster than the per-tensor loop for small models.
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, foreach=device.type == "cuda", **kwargs)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based: the update that produces step + 1).

    Linear warm-up to cfg.lr over warmup_steps (the first update uses lr / warmup_steps, never 0),
    then constant, a cosine from cfg.lr down to cfg.lr * min_lr_ratio at max_steps, or (wsd) constant until
    cfg.decay_start and then linear down to that minimum at max_steps.
    """
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    min_lr = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "wsd":
        start = cfg.decay_start
        if step < start:
            return cfg.lr
        progress = min(1.0, (step + 1 - start) / max(1, cfg.max_steps - start))  # the last update reaches min_lr
        return cfg.lr + (min_lr - cfg.lr) * progress
    decay_steps = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
