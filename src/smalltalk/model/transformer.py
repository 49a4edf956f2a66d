"""Decoder-only Transformer with rotary position embeddings (paper §3.1, App. A.1).

GPT-NeoX layout, so that Hugging Face export is a renaming of weights:
  x = x + attn(ln1(x));  x = x + mlp(ln2(x))       (sequential pre-LN, use_parallel_residual=False)
  attn: fused QKV linear whose output is viewed per head as (A, 3 * head_dim) -> q | k | v,
        full rotary on q and k (rotate-half convention), causal SDPA, output linear
  mlp:  Linear(H, 4H) -> exact GELU -> Linear(4H, H)
Shapes: B batch, T time (new tokens), S keys (cached + new), H hidden, A heads, D head_dim, V vocab.

Initialisation (`Transformer.reset_parameters`, GPT-2 style): every linear and embedding weight
~ N(0, init_std), the two residual output projections (attention `dense`, MLP `dense_4h_to_h`)
~ N(0, init_std / sqrt(2 L)) so the residual stream's variance does not grow with depth, biases
zero, LayerNorm weight one. It draws from torch's global RNG: `torch.manual_seed(s)` before
`Transformer(config)` fixes every weight.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import SmallTalkError
from .config import ModelConfig


def rotary_tables(seq_len: int, head_dim: int, base: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables (seq_len, head_dim) in fp32, duplicated halves (rotate-half convention)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    t = torch.arange(seq_len, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)  # (T, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (T, D)
    return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, A, T, D); cos/sin (T, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def padding_mask(attention_mask: torch.Tensor, T: int) -> torch.Tensor:
    """(B, S) 1 = real token, 0 = padding -> (B, 1, T, S) bool: the last T positions as queries,
    causal, padding keys hidden."""
    B, S = attention_mask.shape
    if S < T:
        raise SmallTalkError(f"attention_mask covers {S} positions but {T} new tokens were given; "
                             "it must cover the cached and the new tokens")
    device = attention_mask.device
    causal = torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=S - T)  # (T, S)
    mask = causal & attention_mask.bool()[:, None, None, :]  # (B, 1, T, S)
    # A padding query sees no real key before it; a fully masked softmax row is NaN, and NaN
    # leaks into real positions through 0 * NaN in later layers. Let every query see itself
    # (padding outputs are never used).
    diagonal = torch.zeros(T, S, dtype=torch.bool, device=device)
    diagonal[torch.arange(T, device=device), torch.arange(S - T, S, device=device)] = True
    return mask | diagonal


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.query_key_value = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None,
                mask: torch.Tensor | None = None):
        """x (B, T, H); kv_cache (k, v) each (B, A, S - T, D); mask (B, 1, T, S) bool, True = may attend."""
        y, cache = attend(self.query_key_value(x), self.num_heads, cos, sin, kv_cache, mask)
        return self.dense(y), cache


def attend(qkv: torch.Tensor, num_heads: int, cos: torch.Tensor, sin: torch.Tensor,
           kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None, mask: torch.Tensor | None = None):
    """Attention between the fused QKV projection and the output projection: qkv (B, T, 3H) -> (B, T, H) and
    the new cache (k, v) each (B, A, S, D). Shared by `Transformer` and `stacked.StackedExperts`."""
    B, T, H3 = qkv.shape
    H = H3 // 3
    head_dim = H // num_heads
    q, k, v = qkv.view(B, T, num_heads, 3 * head_dim).transpose(1, 2).chunk(3, dim=-1)  # each (B, A, T, D)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    if kv_cache is not None:
        past_k, past_v = kv_cache
        k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)  # (B, A, S, D)
    # With a cache, the T new queries attend to everything cached plus the causal part of
    # themselves; is_causal with T == 1 is the same as no mask.
    if mask is not None:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    elif kv_cache is None or T == 1:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=kv_cache is None or T > 1)
    else:
        S = k.shape[2]
        mask = torch.ones(T, S, dtype=torch.bool, device=qkv.device).tril(diagonal=S - T)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return y.transpose(1, 2).reshape(B, T, H), (k, v)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(cfg.hidden_size, cfg.ffn_size)
        self.dense_4h_to_h = nn.Linear(cfg.ffn_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attention = Attention(cfg)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, kv_cache=None, mask=None):
        attn_out, new_cache = self.attention(self.input_layernorm(x), cos, sin, kv_cache, mask)
        x = x + attn_out
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, new_cache


class Transformer(nn.Module):
    """The language model used for routers, experts and the dense baseline."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_in = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([Block(config) for _ in range(config.num_layers)])
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.embed_out = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.embed_out.weight = self.embed_in.weight
        cos, sin = rotary_tables(config.max_seq_len, config.head_dim, config.rotary_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 style init: N(0, init_std) weights, zero biases, residual projections scaled by 1/sqrt(2L)
        so the residual stream's variance does not grow with depth."""
        std = self.config.init_std
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p) if name.endswith("layernorm.weight") or name.endswith("layer_norm.weight") \
                    else nn.init.zeros_(p)
            elif name.endswith("attention.dense.weight") or name.endswith("dense_4h_to_h.weight"):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.config.num_layers))
            else:
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                kv_caches: list | None = None, start_pos: int = 0,
                attention_mask: torch.Tensor | None = None, last_only: bool = False, return_hidden: bool = False):
        """idx (B, T) token ids -> logits (B, T, V).

        With `targets` (B, T) returns (logits, mean cross-entropy over targets != -100).
        With `kv_caches` (a list per layer of (k, v) or None) returns (logits, new_caches), for generation;
        `start_pos` is the position of idx[:, 0] (the length of the cache).
        `attention_mask` (B, start_pos + T), 1 for real tokens and 0 for padding, lets a batch of
        left-padded prompts run together (batched generation); without it every token is real.
        `last_only` returns logits (B, 1, V) for the last position only (all that sampling needs;
        saves the (T, H) x (H, V) output projection of a prefill).
        `return_hidden` returns the final-LayerNorm hidden states (B, T, H) instead of logits, for callers
        that apply the output head themselves (the routers' chunked scoring in routing/score.py).
        """
        B, T = idx.shape
        if last_only and targets is not None:
            raise ValueError("last_only=True drops the logits the loss needs; pass one or the other")
        if return_hidden and (targets is not None or kv_caches is not None):
            raise ValueError("return_hidden=True returns hidden states only: no loss, no caches")
        if start_pos + T > self.config.max_seq_len:
            raise SmallTalkError(f"sequence of {start_pos + T} tokens is longer than the model's context "
                                 f"({self.config.max_seq_len}); truncate the input or use a longer-context model")
        cos = self.rope_cos[start_pos:start_pos + T]
        sin = self.rope_sin[start_pos:start_pos + T]
        mask = None if attention_mask is None else padding_mask(attention_mask, T)
        x = self.embed_in(idx)  # (B, T, H)
        new_caches = []
        for i, layer in enumerate(self.layers):
            x, cache = layer(x, cos, sin, kv_caches[i] if kv_caches is not None else None, mask)
            new_caches.append(cache)
        if last_only:
            x = x[:, -1:]
        x = self.final_layer_norm(x)
        if return_hidden:
            return x
        logits = self.embed_out(x)  # (B, T, V)
        if kv_caches is not None:
            return logits, new_caches
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
