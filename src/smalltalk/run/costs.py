"""What a run cost, in the layout of the paper's Table 3 (App. A.3, Eq. 10-16).

Counts are the ones the run actually performed, put through the paper's formulas
(`smalltalk.model.flops`):

    Eq. 15  experts training   E x 3 x fwd(expert, B, S - 1) x (expert_steps - expert_start)
            seed training      3 x fwd(expert, B_dense, S - 1) x seed_steps   (split training; experts start at
                               step expert_start of their schedule, so seed + experts = the dense tokens)
    Eq. 13  routers training   E x 3 x fwd(router, B_r, M_r - 1) x router_steps   (M_r: tokens the routers train on)
    Eq. 14  routers sharding   (sequences scored during EM) x E routers x inf(router, M)
    Eq. 16  experts sharding   (sequences scored to shard the training data) x E routers x inf(router, M)
    Eq. 10  dense training     3 x fwd(expert, E x B, S - 1) x expert_steps

Training runs a model on the S - 1 input positions of each S-token sequence (the last token is only
a target), the same count the trainer logs. Inference is per S-token sequence (Eq. 11, B = 1):
the expert plus E routers on the M-hat-token routing prefix, vs the dense model.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..model.config import ModelConfig
from ..model.flops import MixtureFlops, inference_flops, training_flops


@dataclass(frozen=True)
class RunCosts(MixtureFlops):
    """The terms of `MixtureFlops`, counted from what the run did, with the overheads taken over the dense
    baseline (the run report's "vs dense"). A run's dense model sees the experts' tokens, so the two readings
    agree there; they differ only for a dense baseline trained on other counts."""

    @property
    def mixture_training(self) -> int:
        return self.total_training  # the name the run results (results.json) and report use

    @property
    def training_overhead(self) -> int:
        return self.total_training - self.dense_training

    @property
    def mixture_inference(self) -> int:
        return self.total_inference

    @property
    def inference_overhead(self) -> int:
        return self.total_inference - self.dense_inference

    _DICT_KEYS = ("num_experts", "seed_training", "experts_training", "routers_training", "routers_sharding", "experts_sharding",
                  "dense_training", "expert_inference", "routers_inference", "dense_inference",
                  "mixture_training", "training_overhead_pct", "mixture_inference", "inference_overhead_pct")


def run_costs(*, expert_cfg: ModelConfig, router_cfg: ModelConfig, num_experts: int, seq_len: int, prefix_len: int,
              expert_steps: int, expert_batch_size: int, dense_steps: int, dense_batch_size: int,
              router_steps: int, router_batch_size: int, router_train_len: int, em_scored_seqs: int,
              shard_scored_seqs: int, inference_prefix_len: int | None = None, seed_steps: int = 0,
              expert_start: int = 0) -> RunCosts:
    """FLOPs of one run; see the module docstring for each term."""
    E = num_experts
    route_one = inference_flops(router_cfg, prefix_len)  # one router, one M-token prefix
    m_hat = prefix_len if inference_prefix_len is None else inference_prefix_len
    return RunCosts(
        num_experts=E,
        seed_training=training_flops(expert_cfg, seed_steps, dense_batch_size, seq_len - 1) if seed_steps else 0,
        experts_training=E * training_flops(expert_cfg, expert_steps - expert_start, expert_batch_size, seq_len - 1),
        routers_training=E * training_flops(router_cfg, router_steps, router_batch_size, router_train_len - 1)
        if router_steps else 0,
        routers_sharding=em_scored_seqs * E * route_one,
        experts_sharding=shard_scored_seqs * E * route_one,
        dense_training=training_flops(expert_cfg, dense_steps, dense_batch_size, seq_len - 1),
        expert_inference=inference_flops(expert_cfg, seq_len),
        routers_inference=E * inference_flops(router_cfg, m_hat),
        dense_inference=inference_flops(expert_cfg, seq_len),
    )


def _sci(x: float) -> str:
    return f"{x:.3e}"


def costs_markdown(c: RunCosts) -> str:
    """Table 3 style: dense, and mixture as 'dense-equivalent + overhead (↑ %)', plus the breakdown."""
    over_train, over_inf = c.training_overhead, c.inference_overhead
    lines = [
        "| Model | Training FLOPs | Inference FLOPs / sequence |",
        "|---|---|---|",
        f"| dense | {_sci(c.dense_training)} | {_sci(c.dense_inference)} |",
        f"| mixture ({c.num_experts} experts) | {_sci(c.dense_training)} + {_sci(over_train)} "
        f"↑ {c.training_overhead_pct:.2f}% | {_sci(c.dense_inference)} + {_sci(over_inf)} "
        f"↑ {c.inference_overhead_pct:.2f}% |",
        "",
        "| Mixture training term | FLOPs | % of dense |",
        "|---|---|---|",
    ]
    seed = (("dense seed, shared by the experts (Eq. 10)", c.seed_training),) if c.seed_training else ()
    for label, value in (*seed, ("experts training (Eq. 15)", c.experts_training),
                         ("routers training (Eq. 13)", c.routers_training),
                         ("routers sharding during EM (Eq. 14)", c.routers_sharding),
                         ("experts data sharding (Eq. 16)", c.experts_sharding),
                         ("total", c.mixture_training)):
        lines.append(f"| {label} | {_sci(value)} | {100.0 * value / c.dense_training:.2f}% |")
    return "\n".join(lines)
