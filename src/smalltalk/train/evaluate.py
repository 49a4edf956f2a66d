"""Exact token-weighted perplexity and bits per byte on a split's shards.

loss = (sum of next-token NLL over every predicted token) / (number of predicted tokens), in nats;
every sequence of S tokens predicts tokens 2..S (S - 1 targets), so batches are weighted by tokens,
not averaged as batch means. ppl = exp(loss).

Bits per byte uses the manifest's per-split ``num_bytes`` (UTF-8 bytes of the text in the split's
complete sequences): bytes_covered = num_bytes * predicted_tokens / split_num_tokens, and
bpb = total_nll_nats / ln(2) / bytes_covered. It compares models with different tokenizers.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data.shards import TokenDataset
from ..errors import SmallTalkError
from ..data.splits import evenly_spaced, load_split
from ..model.io import load_model_dir
from .distributed import DistInfo, all_reduce_sum


@dataclass
class EvalResult:
    loss: float
    """Mean NLL per predicted token (nats)."""
    ppl: float
    bpb: float | None
    """Bits per UTF-8 byte (None when the split's byte count is unknown)."""
    num_tokens: int
    """Predicted tokens evaluated."""
    num_seqs: int

    def to_dict(self) -> dict:
        return asdict(self)


def perplexity(nll_sum: float, num_tokens: int) -> float:
    """Token-weighted perplexity exp(nll_sum / num_tokens), capped so that a diverged model reports a huge
    number instead of overflowing."""
    return math.exp(min(nll_sum / max(num_tokens, 1), 700.0))


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: TokenDataset, indices: np.ndarray | None = None, *, batch_size: int = 16,
             device: torch.device | str = "cpu", autocast_dtype: torch.dtype | None = None,
             bytes_per_token: float | None = None, prefix_len: int | None = None,
             dist_info: DistInfo | None = None) -> EvalResult:
    """Token-weighted NLL of `model` on the sequences `indices` of `data` (all when None).

    `prefix_len` M scores only the first M tokens of each sequence (Eq. 9). Under DDP each rank scores
    a strided slice and the sums are all-reduced, so every rank returns the same result.
    """
    device = torch.device(device)
    dist_info = dist_info or DistInfo()
    indices = np.arange(len(data), dtype=np.int64) if indices is None else np.asarray(indices, dtype=np.int64)
    length = data.seq_len if prefix_len is None else min(prefix_len, data.seq_len)
    max_len = getattr(getattr(model, "config", None), "max_seq_len", None)
    if max_len is not None and length - 1 > max_len:
        raise SmallTalkError(f"sequences of {length} tokens are longer than the model's context ({max_len}); "
                             "evaluate on data prepared with a --seq-len the model supports")
    was_training = model.training
    model.eval()
    nll = torch.zeros((), dtype=torch.float64, device=device)
    mine = indices[dist_info.rank::dist_info.world_size]
    for start in range(0, len(mine), batch_size):
        batch = torch.from_numpy(data.get(mine[start:start + batch_size])[:, :length]).to(device)  # (B, S)
        with autocast_context(device, autocast_dtype):
            logits = model(batch[:, :-1])  # (B, S-1, V)
        nll += F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").double()
    model.train(was_training)
    all_reduce_sum(nll, dist_info)
    num_tokens = len(indices) * (length - 1)
    if num_tokens == 0:
        raise SmallTalkError("nothing to evaluate: no sequences selected")
    total = nll.item()
    if not math.isfinite(total):
        raise SmallTalkError("evaluation loss is NaN or infinite: the model's weights are damaged or it diverged")
    loss = total / num_tokens
    bpb = total / math.log(2) / (num_tokens * bytes_per_token) if bytes_per_token else None
    return EvalResult(loss=loss, ppl=perplexity(total, num_tokens), bpb=bpb, num_tokens=num_tokens,
                      num_seqs=len(indices))


def evaluate_model_dir(model_dir: str | Path, data_dir: str | Path, split: str = "test", *, max_seqs: int = 0,
                       batch_size: int = 16, device: str = "auto") -> EvalResult:
    """Load a model directory and evaluate it on `split` of a prepared data directory.

    `max_seqs` > 0 evaluates an evenly spaced subset of that many sequences (bpb is scaled to match).
    """
    from .distributed import resolve_device

    if batch_size <= 0:
        raise SmallTalkError(f"batch_size={batch_size} must be positive")
    split_data = load_split(data_dir, split)
    dev = resolve_device(device)
    model, config = load_model_dir(model_dir, device=dev)
    model_tok = config.get("tokenizer_sha256")
    if model_tok and split_data.tokenizer_sha256 and model_tok != split_data.tokenizer_sha256:
        raise SmallTalkError(f"{model_dir}: model was trained with tokenizer sha256 {model_tok[:12]} but {data_dir} "
                             f"uses {split_data.tokenizer_sha256[:12]}; evaluate on data prepared with the model's "
                             "tokenizer")
    if split_data.dataset.vocab_size > model.config.vocab_size:
        raise SmallTalkError(f"{data_dir}: vocabulary {split_data.dataset.vocab_size} is larger than the model's "
                             f"({model.config.vocab_size}); use data prepared with the model's tokenizer")
    if split_data.dataset.seq_len - 1 > model.config.max_seq_len:
        raise SmallTalkError(f"{data_dir}: sequences of {split_data.dataset.seq_len} tokens are longer than the "
                             f"context of {model_dir} ({model.config.max_seq_len}); prepare data with "
                             f"--seq-len {model.config.max_seq_len}")
    indices = evenly_spaced(len(split_data.dataset), max_seqs)
    dtype = torch.bfloat16 if dev.type == "cuda" else None
    try:
        return evaluate(model, split_data.dataset, indices, batch_size=batch_size, device=dev, autocast_dtype=dtype,
                        bytes_per_token=split_data.bytes_per_token)
    except SmallTalkError as e:
        raise SmallTalkError(f"{model_dir}: {e}") from None
