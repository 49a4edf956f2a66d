"""E experts of one architecture as one model: rows of different experts advance in one forward.

A decode step of a mixture has a few rows per expert; run as one forward per expert it pays the per-call
overhead E times, which on small models costs more than the arithmetic (measured on the `cpu` experts,
4 experts x 2 rows, one thread: 2.8 ms per step as 4 forwards, 0.43 ms for 8 rows through one model).
Here every weight-bearing operation is one batched matmul. A new set of rows is laid out as (experts, rows
per expert) with padding and multiplied with the stacked weights (E, out, in); rows that stay together for
another step (the decode steps between joins and leaves) gather their experts' weights, (B, in, out) per
linear layer, so a linear layer is then a single `baddbmm` (unless those copies would pass `ROW_WEIGHTS_MAX`
elements). Attention (`transformer.attend`), which has no
weights, runs on the rows as they are. So one step costs about one forward, whatever the experts of its rows.

    stacked = StackedExperts([expert_0, expert_1, ...])      # same config; weights become views of the stack
    logits, caches = stacked(idx, experts=row_experts, kv_caches=..., start_pos=..., attention_mask=...)

The forward takes the arguments of `Transformer.forward` for generation, plus `experts` (B,): the expert of
each row. Row b's logits equal ``experts[row_experts[b]](idx[b:b+1], ...)`` up to float rounding (a test
checks 1e-5); when every row has the same expert, that expert's own forward runs. The experts' modules keep
working: their parameters are views into the stacked tensors, so no weight is held twice.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..errors import SmallTalkError
from .transformer import Transformer, attend, padding_mask

_LINEARS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
_NORMS = ("input_layernorm", "post_attention_layernorm")
ROW_WEIGHTS_MAX = 8 * 2**20
"""Most elements of the per-row weight copies of one batch (32 MB in fp32); past it, the grouped layout."""


class _Rows:
    """How a batch's rows reach their experts' weights: gathered per row, or through the grouped layout."""

    def __init__(self, stacked: "StackedExperts", experts: torch.Tensor, gather: bool):
        self.experts = experts
        per_row = sum(t[0].numel() for t in stacked.params.values())
        self.gathered: dict[str, torch.Tensor] | None = None
        if gather and per_row * len(experts) <= ROW_WEIGHTS_MAX:
            # Linear weights transposed for bmm (B, in, out); biases and norms (B, 1, n); the head (B, H, V).
            self.gathered = {name: (t[experts].transpose(1, 2).contiguous() if t.dim() == 3 else t[experts][:, None, :])
                             for name, t in stacked.params.items() if not name.startswith("embed")}
            self.gathered["head"] = stacked.head_t[experts]
        self.tried_gather = gather
        if self.gathered is not None:
            return
        counts = torch.bincount(experts, minlength=stacked.num_experts)
        self.width = int(counts.max())  # rows per expert in the grouped layout
        order = torch.argsort(experts, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.empty_like(experts)
        rank[order] = torch.arange(len(experts), device=experts.device) - starts[experts[order]]
        self.slots = experts * self.width + rank  # (B,) each row's place in the (E, width) layout


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
        self._rows: _Rows | None = None

    @property
    def device(self) -> torch.device:
        return self.params["embed_in.weight"].device

    def _rows_of(self, experts: torch.Tensor) -> _Rows:
        """A new set of rows starts in the grouped layout; rows that stay for a second step gather their weights
        (under churn, rows joining and leaving every step, a gather per step would cost more than it saves)."""
        if self._rows is None or not torch.equal(self._rows.experts, experts):
            self._rows = _Rows(self, experts.clone(), gather=False)
        elif self._rows.gathered is None and not self._rows.tried_gather:
            self._rows = _Rows(self, self._rows.experts, gather=True)
        return self._rows

    def _grouped(self, rows: _Rows, x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x (B, T, in) through the stacked weight_t (E, in, out) [+ bias (E, out)] in the (E, width) layout."""
        B, T, n_in = x.shape
        grouped = x.new_zeros(self.num_experts * rows.width, T, n_in)
        grouped[rows.slots] = x
        grouped = grouped.view(self.num_experts, rows.width * T, n_in)
        out = torch.baddbmm(bias[:, None, :], grouped, weight_t) if bias is not None else torch.bmm(grouped, weight_t)
        return out.view(self.num_experts * rows.width, T, -1)[rows.slots]

    def _linear(self, name: str, x: torch.Tensor, rows: _Rows) -> torch.Tensor:
        """x (B, T, in) -> (B, T, out), each row through its expert's weight and bias."""
        if rows.gathered is not None:
            g = rows.gathered
            return torch.baddbmm(g[f"{name}.bias"], x, g[f"{name}.weight"])
        return self._grouped(rows, x, self.params[f"{name}.weight"].transpose(1, 2), self.params[f"{name}.bias"])

    def _norm(self, name: str, x: torch.Tensor, rows: _Rows) -> torch.Tensor:
        if rows.gathered is not None:
            weight, bias = rows.gathered[f"{name}.weight"], rows.gathered[f"{name}.bias"]  # (B, 1, H)
        else:
            weight = self.params[f"{name}.weight"][rows.experts][:, None]
            bias = self.params[f"{name}.bias"][rows.experts][:, None]
        return F.layer_norm(x, x.shape[-1:], eps=self.config.layer_norm_eps) * weight + bias

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
        rows = self._rows_of(experts)
        cos, sin = self.rope_cos[start_pos:start_pos + T], self.rope_sin[start_pos:start_pos + T]
        mask = None if attention_mask is None else padding_mask(attention_mask, T)
        x = self.params["embed_in.weight"][experts[:, None], idx]  # (B, T, H)
        new_caches = []
        for i in range(self.config.num_layers):
            p = f"layers.{i}."
            qkv = self._linear(p + _LINEARS[0], self._norm(p + _NORMS[0], x, rows), rows)
            y, cache = attend(qkv, self.config.num_heads, cos, sin, kv_caches[i], mask)
            x = x + self._linear(p + _LINEARS[1], y, rows)
            h = F.gelu(self._linear(p + _LINEARS[2], self._norm(p + _NORMS[1], x, rows), rows))
            x = x + self._linear(p + _LINEARS[3], h, rows)
            new_caches.append(cache)
        if last_only:
            x = x[:, -1:]
        x = self._norm("final_layer_norm", x, rows)
        if rows.gathered is not None:
            return torch.bmm(x, rows.gathered["head"]), new_caches  # (B, T', V)
        return self._grouped(rows, x, self.head_t, None), new_caches
