"""Prefix log-likelihood of sequences under E router language models (paper Eq. 7-9).

The score of sequence x under router e is ``log p(x_{1:M} | theta^{r,e}) = sum_{s=1}^{M-1} log p(x_{s+1} | x_{1:s})``
(the negative of Eq. 9), and routing takes the argmax over e (Eq. 7, uniform expert priors).

All E routers run in one batched computation: their parameters are stacked along a leading expert
dimension (`torch.func.stack_module_state`) and the one `Transformer` forward is evaluated for all E
parameter sets with `vmap`, so every linear layer becomes one batched matmul and no second copy of the
forward pass exists. A test checks the result against a plain loop over the routers.

The output head (H x V per router) dominates the FLOPs of a small router, and its logits are by far
the largest tensor (E x rows x V); rows are processed in chunks so that tensor stays cache-sized and
memory stays bounded no matter how many sequences are scored.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap

from ..errors import SmallTalkError
from ..model.config import ModelConfig
from ..model.transformer import Transformer
from . import rule

# Bytes allowed for one chunk of head logits (E, rows, V) in fp32: large enough for efficient bmm,
# small enough to stay near the CPU's last-level cache.
HEAD_CHUNK_BYTES = 16 * 2**20
MIN_HEAD_ROWS = 16


def check_prefix_len(prefix_len: int, seq_len: int, max_seq_len: int | None = None, where: str = "prefix_len") -> None:
    """M of packed data must fit both the data's sequences and the routers' context (`rule.check_prefix_len`)."""
    rule.check_prefix_len(prefix_len, {"the data's sequences": seq_len, "the routers' context": max_seq_len},
                          where=where)


class StackedRouters:
    """The parameters of E routers with the same config, stacked for one batched (vmapped) forward."""

    def __init__(self, models: Sequence[Transformer], device: str | torch.device | None = None):
        if len(models) == 0:
            raise SmallTalkError("no routers given to score with")
        configs = {tuple(sorted(m.config.to_dict().items())) for m in models}
        if len(configs) != 1:
            raise SmallTalkError("routers have different model configs; all E routers must share one preset")
        self.config: ModelConfig = models[0].config
        self.num_routers = len(models)
        device = torch.device(device) if device is not None else next(models[0].parameters()).device
        self.device = device
        params, _ = stack_module_state(list(models))  # {name: (E, ...)}; a tied head appears once
        self.params = {k: v.detach().to(device=device, dtype=torch.float32) for k, v in params.items()}
        head_key = "embed_in.weight" if self.config.tie_embeddings else "embed_out.weight"
        self.head_t = self.params[head_key].transpose(-1, -2).contiguous()  # (E, H, V)
        self.buffers = {k: v.to(device=device, dtype=torch.float32) for k, v in models[0].named_buffers()}
        with torch.device("meta"):  # the architecture only: the weights are the stacked params
            self._base = Transformer(self.config).eval()

    def hidden_states(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, T) -> final-LayerNorm hidden states (E, B, T, H) of every router."""
        if idx.shape[1] > self.config.max_seq_len:
            raise SmallTalkError(f"prefix of {idx.shape[1]} tokens is longer than the routers' context "
                                 f"({self.config.max_seq_len})")

        def one_router(params: dict, buffers: dict) -> torch.Tensor:
            return functional_call(self._base, (params, buffers), (idx,), {"return_hidden": True})

        with warnings.catch_warnings():
            # CPU SDPA has no vmap batching rule yet: torch loops over E inside attention (measured 0.91-1.01x the
            # speed of attention batched by hand), and its one-time warning says nothing users can act on.
            warnings.filterwarnings("ignore", message=".*batching rule.*")
            return vmap(one_router, in_dims=(0, None))(self.params, self.buffers)

    def token_log_probs(self, idx: torch.Tensor, head_chunk_bytes: int | None = None) -> torch.Tensor:
        """idx (B, T) -> log p(idx[:, s+1] | idx[:, :s+1]) under every router: (E, B, T-1) fp32."""
        E, V = self.num_routers, self.config.vocab_size
        B, T = idx.shape
        hidden = self.hidden_states(idx)[:, :, :-1].reshape(E, B * (T - 1), -1)  # (E, R, H), R = B*(T-1)
        targets = idx[:, 1:].reshape(-1)  # (R,)
        out = torch.empty(E, B * (T - 1), dtype=torch.float32, device=idx.device)
        # At least a few rows per router so each bmm is still an efficient matmul when E * V is large.
        rows = max(MIN_HEAD_ROWS, (head_chunk_bytes or HEAD_CHUNK_BYTES) // (4 * E * V))
        for r0 in range(0, hidden.shape[1], rows):
            r1 = min(r0 + rows, hidden.shape[1])
            logits = torch.bmm(hidden[:, r0:r1], self.head_t)  # (E, r, V)
            # Fused log-softmax + gather: fewer passes over the logits than logsumexp + gather.
            nll = F.cross_entropy(logits.view(-1, V), targets[None, r0:r1].expand(E, -1).reshape(-1),
                                  reduction="none")  # (E * r,)
            out[:, r0:r1] = -nll.view(E, r1 - r0)
        return out.view(E, B, T - 1)


@torch.no_grad()
def prefix_scores(routers: StackedRouters | Sequence[Transformer], tokens: np.ndarray | torch.Tensor,
                  prefix_len: int, batch_size: int = 16) -> np.ndarray:
    """(N, E) float64 log-likelihood of each sequence's first `prefix_len` tokens under each router.

    `tokens` (N, >= prefix_len) int token ids; only the prefix is read. Batches of `batch_size`
    sequences bound memory; all routers run together on each batch. The per-token log-probs are summed by
    `rule.window_scores`, the one Eq. 8 sum of every routing path (EM, sharding, evaluation, serving), so a
    near-tie is decided the same way in training and at inference.
    """
    stacked = routers if isinstance(routers, StackedRouters) else StackedRouters(list(routers))
    tokens = torch.as_tensor(np.asarray(tokens) if not isinstance(tokens, torch.Tensor) else tokens)
    if tokens.ndim != 2:
        raise SmallTalkError(f"tokens must be (num_seqs, seq_len), got shape {tuple(tokens.shape)}")
    check_prefix_len(prefix_len, tokens.shape[1], stacked.config.max_seq_len)
    N = tokens.shape[0]
    scores = np.empty((N, stacked.num_routers), dtype=np.float64)
    for b0 in range(0, N, batch_size):
        idx = tokens[b0:b0 + batch_size, :prefix_len].to(device=stacked.device, dtype=torch.long)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= stacked.config.vocab_size):
            raise SmallTalkError(f"token id {int(idx.max())} out of range for the routers' vocabulary "
                                 f"({stacked.config.vocab_size}); routers and data use different tokenizers")
        logp = stacked.token_log_probs(idx).permute(1, 0, 2).cpu().numpy()  # (B, E, M - 1)
        scores[b0:b0 + len(idx)] = rule.window_scores(logp, prefix_len)  # (B, E)
    return scores


@torch.no_grad()
def prefix_scores_loop(models: Sequence[Transformer], tokens: np.ndarray | torch.Tensor, prefix_len: int,
                       batch_size: int = 16) -> np.ndarray:
    """Reference: one plain ``Transformer.forward`` per router and batch, full logits + cross-entropy.
    Same result as `prefix_scores` (up to float rounding); used by tests and the benchmark."""
    tokens = torch.as_tensor(np.asarray(tokens) if not isinstance(tokens, torch.Tensor) else tokens)
    N = tokens.shape[0]
    scores = np.empty((N, len(models)), dtype=np.float32)
    for e, model in enumerate(models):
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        for b0 in range(0, N, batch_size):
            idx = tokens[b0:b0 + batch_size, :prefix_len].to(device=device, dtype=torch.long)
            logits = model(idx)[:, :-1].float()  # (B, M-1, V)
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1), reduction="none")
            scores[b0:b0 + len(idx), e] = (-nll.view(len(idx), -1).sum(-1)).cpu().numpy()
        model.train(was_training)
    return scores


def score_dataset(routers: StackedRouters, dataset, indices: np.ndarray, prefix_len: int, batch_size: int = 32,
                  read_batch: int = 4096) -> np.ndarray:
    """(len(indices), E) prefix scores of the sequences `indices` of a TokenDataset, reading `read_batch`
    sequences at a time so memory stays bounded however many are scored."""
    check_prefix_len(prefix_len, dataset.seq_len, routers.config.max_seq_len)
    indices = np.asarray(indices, dtype=np.int64)
    out = np.empty((len(indices), routers.num_routers), dtype=np.float64)
    for r0 in range(0, len(indices), read_batch):
        tokens = dataset.get(indices[r0:r0 + read_batch])[:, :prefix_len]  # (b, M) int64
        out[r0:r0 + len(tokens)] = prefix_scores(routers, tokens, prefix_len, batch_size=batch_size)
    return out


def mean_prefix_nll(scores: np.ndarray, prefix_len: int) -> np.ndarray:
    """Per-token prefix NLL (nats) from summed log-likelihood scores: -score / (M - 1)."""
    return -np.asarray(scores, dtype=np.float64) / max(1, prefix_len - 1)
