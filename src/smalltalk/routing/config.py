"""Configuration of router training by EM (paper §2.2, Algorithm 1 lines 1-10, App. A.1, A.4).

Paper settings: E routers of 4.4M parameters, prefix M = 256, batch 32, constant lr 1e-4 after a
1k-step warm-up, 128k steps, and a score exchange every ~45M tokens per router, i.e. every
45M / (1024 * 32) ~ 1373 steps (~94 exchanges). One EM iteration here is one such period: every
router trains `steps_per_iteration` steps on its segment, then N new sequences are scored by all
routers and assigned. By default N = steps_per_iteration * batch_size * E, so each router sees its
segment about once per iteration (45M * E / 1024 sequences in the paper).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..config_dict import DictConfig, check_field_types
from ..errors import SmallTalkError
from ..model.config import PRESETS
from ..train.config import TrainConfig
from . import rule

SCORE_DTYPES = ("float32", "float16")


@dataclass
class RouterEMConfig(DictConfig):
    config_kind = "router EM config"

    num_experts: int = 4
    """E: routers (= experts); at least 2."""
    prefix_len: int = 64
    """M: tokens of each sequence that routers train on (Eq. 9) and score (Eq. 8). Paper: 256."""
    iterations: int = 4
    """T: EM iterations (train all routers, then score and re-assign N new sequences)."""
    steps_per_iteration: int = 50
    """Optimizer steps each router takes on its segment per iteration."""
    seqs_per_iteration: int | None = None
    """N: new sequences scored and assigned per iteration; None = steps_per_iteration * batch_size * E."""
    router_preset: str = "cpu-router"
    """Model preset of every router (vocabulary and context are taken from the data)."""
    batch_size: int = 16
    """Sequences per router optimizer step (paper: 32)."""
    lr: float = 1e-3
    """Constant learning rate after warm-up (paper: 1e-4)."""
    warmup_steps: int = 50
    """Linear warm-up steps, counted once over the whole run (the optimizer state carries across iterations)."""
    weight_decay: float = 0.1
    grad_clip: float = 0.1
    seed: int = 0
    """Fixes the initial random assignment, the sequences sampled per iteration, and each router's init
    and data order (router e uses seed * 1000 + e, whatever the number of workers)."""
    heldout_seqs: int = 256
    """Sequences of the valid split (evenly spaced, fixed) used to log held-out prefix NLL and routing changes."""
    score_batch_size: int = 32
    """Sequences per batched scoring forward pass (all routers at once)."""
    score_dtype: str = "float32"
    """Precision of the exchanged scores: "float32" or "float16" (paper). Applied on 1 worker too, so results
    do not depend on the number of workers. fp16 keeps ~3 significant digits of a summed log-likelihood."""
    device: str = "auto"
    """"auto" (cuda when available), "cpu", "cuda"."""
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        check_field_types(self, self.config_kind)
        for key in ("num_experts", "prefix_len", "iterations", "steps_per_iteration", "batch_size",
                    "score_batch_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise SmallTalkError(f"router EM config: {key}={value!r} must be a positive integer")
        if self.num_experts < 2:
            raise SmallTalkError(f"router EM config: num_experts={self.num_experts}: a mixture needs at least 2 "
                                 "experts (routers); use --num-experts 2 or more")
        rule.check_prefix_len(self.prefix_len, where="router EM config: prefix_len")
        for key in ("warmup_steps", "seed", "heldout_seqs"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise SmallTalkError(f"router EM config: {key}={value!r} must be a non-negative integer")
        if self.seqs_per_iteration is not None:
            if not isinstance(self.seqs_per_iteration, int) or self.seqs_per_iteration <= 0:
                raise SmallTalkError(f"router EM config: seqs_per_iteration={self.seqs_per_iteration!r} must be a "
                                     "positive integer or None")
        if self.num_experts > self.num_seqs:
            raise SmallTalkError(f"router EM config: num_experts={self.num_experts} > seqs_per_iteration="
                                 f"{self.num_seqs}: some router would get no sequences; raise --seqs-per-iteration")
        if self.router_preset not in PRESETS:
            raise SmallTalkError(f"router EM config: router_preset={self.router_preset!r}; choose one of "
                                 f"{', '.join(PRESETS)}")
        if self.score_dtype not in SCORE_DTYPES:
            raise SmallTalkError(f"router EM config: score_dtype={self.score_dtype!r}; choose one of "
                                 f"{', '.join(SCORE_DTYPES)}")
        if not self.lr > 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise SmallTalkError(f"router EM config: lr={self.lr} must be > 0, weight_decay={self.weight_decay} and "
                                 f"grad_clip={self.grad_clip} >= 0")

    @property
    def num_seqs(self) -> int:
        """N, resolved."""
        if self.seqs_per_iteration is not None:
            return self.seqs_per_iteration
        return self.steps_per_iteration * self.batch_size * self.num_experts

    @property
    def total_steps(self) -> int:
        return self.iterations * self.steps_per_iteration

    def router_seed(self, e: int) -> int:
        return self.seed * 1000 + e

    def train_config(self, e: int) -> TrainConfig:
        """Router e's trainer settings: Eq. 9 loss on the prefix, constant lr after warm-up, no periodic eval
        (EM logs held-out NLL itself), a checkpoint at the end of every iteration; two are kept because a worker
        may be one iteration ahead of the saved EM state when another one dies (see em_state.py)."""
        return TrainConfig(lr=self.lr, warmup_steps=self.warmup_steps, schedule="constant", max_steps=self.total_steps,
                           batch_size=self.batch_size, weight_decay=self.weight_decay, grad_clip=self.grad_clip,
                           eval_every=0, checkpoint_every=0, keep_last_k=2, log_every=max(1, self.steps_per_iteration),
                           seed=self.router_seed(e), device=self.device, loss_prefix_len=self.prefix_len,
                           name=f"router-em-{self.name}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["num_seqs_resolved"] = self.num_seqs
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RouterEMConfig":
        return super().from_dict({k: v for k, v in d.items() if k != "num_seqs_resolved"})

    def describe(self) -> str:
        return (f"{self.name}: E={self.num_experts} routers ({self.router_preset}), M={self.prefix_len}, "
                f"T={self.iterations} iterations x {self.steps_per_iteration} steps x {self.batch_size} seqs, "
                f"N={self.num_seqs} seqs/iteration, lr {self.lr:g} (warm-up {self.warmup_steps})")


ROUTER_EM_PRESETS: dict[str, RouterEMConfig] = {
    # Tests and the quickstart: seconds on 2 cores with the `tiny` model.
    "tiny": RouterEMConfig(num_experts=2, prefix_len=32, iterations=3, steps_per_iteration=15, batch_size=8,
                           lr=3e-3, warmup_steps=5, heldout_seqs=64, router_preset="tiny", name="tiny"),
    # CPU runs on the sample corpus (minutes on 2 cores).
    "cpu": RouterEMConfig(num_experts=4, prefix_len=64, iterations=6, steps_per_iteration=60, batch_size=16,
                          lr=2e-3, warmup_steps=30, heldout_seqs=256, router_preset="cpu-router", name="cpu"),
    # Paper (§3.1, App. A.1/A.4): 4.4M routers, M = 256, batch 32, lr 1e-4 after 1k warm-up, 128k steps
    # in ~94 exchanges of ~1373 steps (45M tokens per router at S = 1024).
    "paper": RouterEMConfig(num_experts=4, prefix_len=256, iterations=94, steps_per_iteration=1373, batch_size=32,
                            lr=1e-4, warmup_steps=1000, heldout_seqs=1024, router_preset="router-4.4m",
                            score_batch_size=64, name="paper"),
}


def router_em_preset(name: str, **overrides) -> RouterEMConfig:
    """A copy of the named preset with `overrides` applied (None values are ignored)."""
    if name not in ROUTER_EM_PRESETS:
        raise SmallTalkError(f"unknown router EM preset {name!r}; choose one of {', '.join(ROUTER_EM_PRESETS)}")
    return ROUTER_EM_PRESETS[name].replace(**{k: v for k, v in overrides.items() if v is not None})
