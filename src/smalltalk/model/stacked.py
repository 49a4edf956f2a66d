"""E experts of one architecture as one model: rows of different experts advance in one forward.

A decode step of a mixture has a few rows per expert; run as one forward per expert it pays the per-call
overhead E times, which on small models costs more than the arithmetic (measured on the `cpu` experts,
4 experts x 2 rows, one thread: 2.8 ms per step as 4 forwards, 0.43 ms for 8 rows through one model).
Here every weight-bearing operation is a batched matmul over the experts' stacked weights: the rows are
laid out as (experts, rows per expert) with padding, multiplied with their expert's weights by `bmm`, and
put back in batch order; attention (`transformer.attend`), which has no weights, runs on the rows as they
are. So one step costs about one forward, whatever the experts of its rows.

    stacked = StackedExperts([expert_0, expert_1, ...])      # same config; weights become views of the stack
    logits, caches = stacked(idx, experts=row_experts, kv_caches=..., start_pos=..., attention_mask=...)

The forward takes the arguments of `Transformer.forward` for generation, plus `experts` (B,): the expert of
each row. Row b's logits equal ``experts[row_experts[b]](idx[b:b+1], ...)`` up to float rounding (a test
checks 1e-5). The experts' own modules keep working: their parameters are views into the stacked tensors,
so no weight is held twice.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..errors import SmallTalkError
from .transformer import Transformer, attend, padding_mask

_LINEARS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
_NORMS = ("input_layernorm", "post_attention_layernorm")


class StackedExperts:
    def __init__(self, models: Sequence[Transformer]):
        if not models:
            raise SmallTalkError("StackedExperts: no experts given")
        config = models[0].config
        if any(m.config != config for m in models):
            raise SmallTalkError("StackedExperts: the experts have different model configs; they cannot be stacked")
        self.config, self.models, self.num_experts = config, list(models), len(models)
        self.params: dict[str, torch.Tensor] = {}
        for name, _ in models[0].named_parameters():  # a tied head appears once
            stacked = torch.stack([dict(m.named_parameters())[name].detach() for m in models])  # (E, ...)
            for e, m in enumerate(models):
                dict(m.named_parameters())[name].data = stacked[e]  # each expert's weights: a view of the stack
            self.params[name] = stacked
        self.rope_cos, self.rope_sin = models[0].rope_cos, models[0].rope_sin
        head = "embed_in.weight" if config.tie_embeddings else "embed_out.weight"
        self.head_t = self.params[head].transpose(1, 2)  # (E, H, V)

    @property
    def device(self) -> torch.device:
        return self.params["embed_in.weight"].device

    def _slots(self, experts: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Each row's place in the (E, rows per expert) layout: (B,) flat slot indices, rows per expert."""
        counts = torch.bincount(experts, minlength=self.num_experts)
        width = int(counts.max())
        order = torch.argsort(experts, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.empty_like(experts)
        rank[order] = torch.arange(len(experts), device=experts.device) - starts[experts[order]]
        return experts * width + rank, width

    def _linear(self, name: str, x: torch.Tensor, slots: torch.Tensor, width: int) -> torch.Tensor:
        """x (B, T, in) -> (B, T, out), each row through its expert's weight (E, out, in) and bias (E, out)."""
        weight, bias = self.params[f"{name}.weight"], self.params.get(f"{name}.bias")
        B, T, n_in = x.shape
        grouped = x.new_zeros(self.num_experts * width, T, n_in)
        grouped[slots] = x
        grouped = grouped.view(self.num_experts, width * T, n_in)
        if bias is not None:
            out = torch.baddbmm(bias[:, None, :], grouped, weight.transpose(1, 2))  # (E, width * T, out)
        else:
            out = torch.bmm(grouped, weight.transpose(1, 2))
        return out.view(self.num_experts * width, T, -1)[slots]

    def _norm(self, name: str, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        weight, bias = self.params[f"{name}.weight"][experts], self.params[f"{name}.bias"][experts]  # (B, H)
        return F.layer_norm(x, x.shape[-1:], eps=self.config.layer_norm_eps) * weight[:, None] + bias[:, None]

    @torch.inference_mode()
    def __call__(self, idx: torch.Tensor, *, experts: torch.Tensor, kv_caches: list, start_pos: int = 0,
                 attention_mask: torch.Tensor | None = None, last_only: bool = True):
        """idx (B, T), experts (B,) -> (logits (B, T or 1, V), new caches); see `Transformer.forward`."""
        B, T = idx.shape
        if start_pos + T > self.config.max_seq_len:
            raise SmallTalkError(f"sequence of {start_pos + T} tokens is longer than the model's context "
                                 f"({self.config.max_seq_len}); truncate the input or use a longer-context model")
        experts = experts.to(device=idx.device, dtype=torch.long)
        if bool((experts == experts[0]).all()):  # one expert: its own forward, no padding for the others
            return self.models[int(experts[0])](idx, kv_caches=kv_caches, start_pos=start_pos,
                                                attention_mask=attention_mask, last_only=last_only)
        slots, width = self._slots(experts)
        cos, sin = self.rope_cos[start_pos:start_pos + T], self.rope_sin[start_pos:start_pos + T]
        mask = None if attention_mask is None else padding_mask(attention_mask, T)
        x = self.params["embed_in.weight"][experts[:, None], idx]  # (B, T, H)
        new_caches = []
        for i in range(self.config.num_layers):
            p = f"layers.{i}."
            qkv = self._linear(p + _LINEARS[0], self._norm(p + _NORMS[0], x, experts), slots, width)
            y, cache = attend(qkv, self.config.num_heads, cos, sin, kv_caches[i], mask)
            x = x + self._linear(p + _LINEARS[1], y, slots, width)
            h = F.gelu(self._linear(p + _LINEARS[2], self._norm(p + _NORMS[1], x, experts), slots, width))
            x = x + self._linear(p + _LINEARS[3], h, slots, width)
            new_caches.append(cache)
        if last_only:
            x = x[:, -1:]
        x = self._norm("final_layer_norm", x, experts)
        grouped = x.new_zeros(self.num_experts * width, x.shape[1], x.shape[2])
        grouped[slots] = x
        logits = torch.bmm(grouped.view(self.num_experts, -1, x.shape[2]), self.head_t)  # (E, width * T', V)
        return logits.view(self.num_experts * width, x.shape[1], -1)[slots], new_caches
