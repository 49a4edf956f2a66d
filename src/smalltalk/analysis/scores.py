"""Per-sequence scores of a mixture's models on a test split, computed once and cached.

Every analysis here asks "which expert would this sequence go to under routing rule X, and what is
the perplexity then?". One pass of every expert and of the dense model over the split answers it for
every rule: `SequenceScores` (mixture/scores.py) keeps, per sequence, the summed NLL under each expert
and the dense model, and each expert's per-token log-probs (so experts can route for themselves on any prefix, as the
random-shard control and the self-routing row of the router-size analysis do). Router log-probs are
cheap (routers are small) and computed on demand for the longest prefix asked.

Cache: ``<run>/analysis/cache/scores_<key>.npz``, where the key hashes the weights of every model,
the split and the selected sequences, so a retrained model or another subset never reuses stale
numbers. Written atomically.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import SmallTalkError
from ..routing import rule
from ..io import atomic_write_bytes
from ..model.io import WEIGHTS_FILE, sha256_file
from ..mixture.scores import SequenceScores

CACHE_DIR = "cache"


def check_lm_prefix_len(prefix_len, limit: int, limit_name: str) -> int:
    """M-hat of packed test sequences routed by LM likelihood (`rule.check_prefix_len`)."""
    return rule.check_prefix_len(prefix_len, {limit_name: limit}, where="prefix length M-hat")


# ----------------------------------------------------------------------------- computing


def weights_sha(model_dir: Path) -> str:
    path = Path(model_dir) / WEIGHTS_FILE
    if not path.is_file():
        raise SmallTalkError(f"{path}: model weights not found; train that model first")
    return sha256_file(path)


def _cache_key(expert_dirs: Sequence[Path], dense_dir: Path | None, split: str, indices: np.ndarray) -> str:
    ident = {"experts": [weights_sha(d) for d in expert_dirs],
             "dense": weights_sha(dense_dir) if dense_dir else None, "split": split,
             "indices": hashlib.sha256(np.ascontiguousarray(indices, dtype=np.int64).tobytes()).hexdigest()}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def select_sequences(num_seqs: int, max_seqs: int) -> np.ndarray:
    from ..data.splits import evenly_spaced

    if max_seqs < 0:
        raise SmallTalkError(f"max_seqs={max_seqs} must be >= 0 (0: the whole split)")
    return evenly_spaced(num_seqs, max_seqs)


def score_models(expert_dirs: Sequence[Path], dense_dir: Path | None, data_dir: Path, *, split: str = "test",
                 max_seqs: int = 0, batch_size: int = 16, device: str = "auto", cache_dir: Path | None = None,
                 log: Callable[[str], None] | None = None) -> SequenceScores:
    """Score `split` of `data_dir` with every expert (and the dense model); cached in `cache_dir`."""
    from ..model.io import load_model_dir
    from ..mixture.inference import resolve_device, token_logprobs
    from ..data.splits import load_split

    data = load_split(data_dir, split)
    indices = select_sequences(len(data.dataset), max_seqs)
    key = _cache_key(expert_dirs, dense_dir, split, indices)
    path = Path(cache_dir) / f"scores_{key}.npz" if cache_dir else None
    if path is not None and path.is_file():
        with np.load(path) as z:
            return SequenceScores(z["expert_nll"], z["dense_nll"] if z["has_dense"] else None, z["domains"],
                                  z["expert_logp"].shape[2], expert_logp=z["expert_logp"], indices=z["indices"],
                                  bytes_per_token=data.bytes_per_token)
    dev = resolve_device(device)
    tokens = data.dataset.get(indices)  # (N, S)
    N, S = tokens.shape
    expert_logp = np.zeros((N, len(expert_dirs), S - 1), dtype=np.float32)
    for e, d in enumerate(expert_dirs):
        model, cfg_json = load_model_dir(d, device=dev)
        _check_model_fits(model, d, data, S)
        expert_logp[:, e] = token_logprobs(model, tokens, batch_size=batch_size, device=dev)
        del model
        if log:
            log(f"scored {N} {split} sequences with expert {e}")
    dense_nll = None
    if dense_dir is not None:
        model, _ = load_model_dir(dense_dir, device=dev)
        _check_model_fits(model, dense_dir, data, S)
        dense_nll = -token_logprobs(model, tokens, batch_size=batch_size, device=dev).sum(axis=1, dtype=np.float64)
        del model
        if log:
            log(f"scored {N} {split} sequences with the dense model")
    scores = SequenceScores(-expert_logp.sum(axis=2, dtype=np.float64), dense_nll, data.dataset.domains(indices),
                            S - 1, expert_logp=expert_logp, indices=indices, bytes_per_token=data.bytes_per_token)
    if path is not None:
        buf = io.BytesIO()
        np.savez(buf, indices=scores.indices, domains=scores.domains, expert_nll=scores.expert_nll,
                 expert_logp=scores.expert_logp, has_dense=dense_nll is not None,
                 dense_nll=dense_nll if dense_nll is not None else np.zeros(0))
        atomic_write_bytes(path, buf.getvalue())
    return scores


def _check_model_fits(model, model_dir: Path, data, seq_len: int) -> None:
    if data.dataset.vocab_size > model.config.vocab_size or seq_len - 1 > model.config.max_seq_len:
        raise SmallTalkError(f"{model_dir}: model (vocab {model.config.vocab_size}, context "
                             f"{model.config.max_seq_len}) does not fit the data (vocab {data.dataset.vocab_size}, "
                             f"seq_len {seq_len}); analyse a run on the data its models were trained on")


def router_logp(routers_dir: Path, data_dir: Path, indices: np.ndarray, prefix_len: int, *, split: str = "test",
                batch_size: int = 64, device: str = "auto") -> np.ndarray:
    """(N, E, prefix_len - 1) float32 log-probs of prefix tokens 2..prefix_len under each router."""
    from ..mixture.inference import resolve_device, router_token_logprobs
    from ..routing.routers_dir import load_routers
    from ..routing.score import StackedRouters
    from ..data.splits import load_split

    dev = resolve_device(device)
    models, _ = load_routers(routers_dir, device=str(dev))
    context = min(models[0].config.max_seq_len, load_split(data_dir, split).dataset.seq_len)
    check_lm_prefix_len(prefix_len, context, f"the routers' context / the sequence length of {data_dir}")
    tokens = load_split(data_dir, split).dataset.get(indices)[:, :prefix_len]
    return router_token_logprobs(StackedRouters(models, device=dev), tokens, batch_size=batch_size)
