"""Training configuration and named presets.

``batch_size`` is the *global* number of sequences per optimizer step (paper Table 2), split over
``grad_accum`` micro-steps and over the data-parallel ranks, so the same config gives the same
optimization trajectory on 1 process or N (up to float reduction order).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config_dict import DictConfig, check_field_types
from ..errors import SmallTalkError

SCHEDULES = ("cosine", "constant", "wsd")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class TrainConfig(DictConfig):
    config_kind = "train config"

    lr: float = 5e-4
    """Peak learning rate, reached at the end of warm-up."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * min_lr_ratio (ignored by the constant schedule)."""
    warmup_steps: int = 3000
    """Linear warm-up from 0 to lr over this many optimizer steps."""
    schedule: str = "cosine"
    """"cosine": warm-up then cosine decay to the minimum at max_steps (experts, dense);
    "constant": warm-up then constant lr (routers, paper App. A.1);
    "wsd": warm-up, stable at lr, then a linear decay to lr * min_lr_ratio over the last decay_fraction of
    max_steps (warm-up-stable-decay: every shorter budget is the stable run's checkpoint plus its own decay)."""
    decay_fraction: float = 0.2
    """"wsd" only: the share of max_steps spent decaying (saved only for that schedule)."""
    max_steps: int = 256_000
    """Optimizer steps in the whole run."""
    batch_size: int = 128
    """Global sequences per optimizer step (over all ranks and micro-steps)."""
    grad_accum: int = 1
    """Micro-steps per optimizer step; the micro-batch is batch_size / (grad_accum * world_size)."""
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.1
    """AdamW decoupled weight decay on matrices only (not on biases, LayerNorm)."""
    grad_clip: float = 0.1
    """Max global gradient L2 norm (paper: 0.1); 0 disables clipping."""
    eval_every: int = 1000
    """Validate every N steps (0: never; also at the end of the run)."""
    eval_batches: int = 20
    """Validation batches of batch_size sequences per evaluation (0: the whole split)."""
    checkpoint_every: int = 1000
    """Write a resumable checkpoint every N steps (and at the end of each train() call)."""
    keep_last_k: int = 3
    """Checkpoints kept on disk; older ones are deleted after a new one is complete."""
    log_every: int = 1
    """Append a metrics.jsonl line every N steps."""
    seed: int = 1234
    """Fixes initialisation and the data order."""
    device: str = "auto"
    """"auto" (cuda when available, else cpu), "cpu", "cuda", "cuda:1", ..."""
    precision: str = "auto"
    """"auto": fp32 on CPU, bf16 autocast on CUDA; or force "fp32" / "bf16"."""
    compile: bool = False
    """Wrap the model in torch.compile (CUDA mostly; slow to start on CPU)."""
    loss_prefix_len: int | None = None
    """None: loss on the whole sequence (Eq. 1). M: train on the first M tokens only (Eq. 9, routers)."""
    name: str = field(default="custom", compare=False)
    """Preset this config came from (informational)."""

    def __post_init__(self) -> None:
        check_field_types(self, self.config_kind)
        for key in ("max_steps", "batch_size", "grad_accum", "keep_last_k", "log_every"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise SmallTalkError(f"train config: {key}={value!r} must be a positive integer")
        for key in ("warmup_steps", "eval_every", "eval_batches", "checkpoint_every", "seed"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise SmallTalkError(f"train config: {key}={value!r} must be a non-negative integer")
        if not self.lr > 0:
            raise SmallTalkError(f"train config: lr={self.lr!r} must be positive")
        if not 0 <= self.min_lr_ratio <= 1:
            raise SmallTalkError(f"train config: min_lr_ratio={self.min_lr_ratio!r} must be in [0, 1]")
        for key in ("beta1", "beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise SmallTalkError(f"train config: {key}={getattr(self, key)!r} must be in [0, 1)")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.eps <= 0:
            raise SmallTalkError(f"train config: weight_decay={self.weight_decay}, grad_clip={self.grad_clip} must be "
                                 f">= 0 and eps={self.eps} > 0")
        if not 0 < self.decay_fraction <= 1:
            raise SmallTalkError(f"train config: decay_fraction={self.decay_fraction!r} must be in (0, 1]")
        if self.schedule not in SCHEDULES:
            raise SmallTalkError(f"train config: schedule={self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.precision not in PRECISIONS:
            raise SmallTalkError(f"train config: precision={self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.batch_size % self.grad_accum:
            raise SmallTalkError(f"train config: grad_accum={self.grad_accum} does not divide "
                                 f"batch_size={self.batch_size}")
        if self.loss_prefix_len is not None and (not isinstance(self.loss_prefix_len, int)
                                                 or self.loss_prefix_len < 2):
            raise SmallTalkError(f"train config: loss_prefix_len={self.loss_prefix_len!r} must be None or an "
                                 "integer >= 2 (one input token and one target)")

    def to_dict(self) -> dict:
        d = super().to_dict()
        if self.schedule != "wsd":  # saved configs of the other schedules stay as they were
            d.pop("decay_fraction")
        return d

    @property
    def decay_start(self) -> int:
        """First step of the "wsd" decay (max_steps for the other schedules: they have no stable phase)."""
        if self.schedule != "wsd":
            return self.max_steps
        return max(self.warmup_steps, self.max_steps - round(self.decay_fraction * self.max_steps))

    def micro_batch_size(self, world_size: int = 1) -> int:
        """Sequences per forward pass on one rank."""
        per_step = self.grad_accum * world_size
        if self.batch_size % per_step:
            raise SmallTalkError(f"train config: batch_size={self.batch_size} is not divisible by grad_accum "
                                 f"({self.grad_accum}) x world size ({world_size}); change --batch-size")
        return self.batch_size // per_step

    def rescaled(self, max_steps: int, **changes) -> "TrainConfig":
        """The same training stretched or shrunk to `max_steps`: warm-up, validation and checkpoint cadence keep
        their fraction of the run (a cadence of 0, never, stays 0); `changes` replace other fields."""
        scale = max_steps / self.max_steps
        every = lambda n: max(1, round(n * scale)) if n else 0  # noqa: E731
        return self.replace(max_steps=max_steps, warmup_steps=round(self.warmup_steps * scale),
                            eval_every=every(self.eval_every), checkpoint_every=every(self.checkpoint_every), **changes)

    def describe(self) -> str:
        prefix = "" if self.loss_prefix_len is None else f", loss on first {self.loss_prefix_len} tokens"
        schedule = f"wsd, decay from step {self.decay_start}" if self.schedule == "wsd" else self.schedule
        return (f"{self.name}: {self.max_steps} steps x {self.batch_size} seqs, lr {self.lr:g} ({schedule}, "
                f"warm-up {self.warmup_steps}), clip {self.grad_clip:g}, wd {self.weight_decay:g}{prefix}")


# Paper App. A.1 / Table 2, and CPU-scale presets for this project.
TRAIN_PRESETS: dict[str, TrainConfig] = {
    # Tests and the quickstart: seconds on 2 cores with the `tiny` model.
    "tiny": TrainConfig(lr=3e-3, warmup_steps=10, max_steps=60, batch_size=8, eval_every=20, eval_batches=4,
                        checkpoint_every=20, keep_last_k=2, name="tiny"),
    # The `cpu-small` model in about an hour on 2 cores (~2M tokens at ~600 tokens/s; see
    # benchmarks/results/train_throughput.md for this machine's rate).
    "cpu-small": TrainConfig(lr=2e-3, warmup_steps=50, max_steps=500, batch_size=16, eval_every=100,
                             eval_batches=8, checkpoint_every=100, name="cpu-small"),
    # A CPU router (Eq. 9 on a 64-token prefix, constant lr); used by EM for each router.
    "cpu-router": TrainConfig(lr=1e-3, warmup_steps=50, schedule="constant", max_steps=2000, batch_size=16,
                              eval_every=0, checkpoint_every=250, loss_prefix_len=64, name="cpu-router"),
    # Paper: experts of the mixture (batch 128, 5e-4 with 3k warm-up, cosine).
    "paper-expert": TrainConfig(lr=5e-4, warmup_steps=3000, max_steps=256_000, batch_size=128, name="paper-expert"),
    # Paper: the 335M dense baseline (batch 512).
    # Paper: routers (4.4M, batch 32, constant 1e-4 after 1k warm-up, 128k steps, prefix 256).
    "paper-router": TrainConfig(lr=1e-4, warmup_steps=1000, schedule="constant", max_steps=128_000, batch_size=32,
                                loss_prefix_len=256, name="paper-router"),
}


def train_preset(name: str, **overrides) -> TrainConfig:
    """A copy of the named training preset with `overrides` applied (None values are ignored)."""
    if name not in TRAIN_PRESETS:
        raise SmallTalkError(f"unknown train preset {name!r}; choose one of {', '.join(TRAIN_PRESETS)}")
    changes = {k: v for k, v in overrides.items() if v is not None}
    return TRAIN_PRESETS[name].replace(**changes)
