"""Per-sequence scores of a mixture's models on a test split, computed once and cached.

Every analysis here asks "which expert would this sequence go to under routing rule X, and what is
the perplexity then?". One pass of every expert and of the dense model over the split answers it for
every rule: `TestScores` keeps, per sequence, the summed NLL under each expert and the dense model,
and each expert's per-token log-probs (so experts can route for themselves on any prefix, as the
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
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import SmallTalkError
from ..routing import rule
from ..io import atomic_write_bytes
from ..model.io import WEIGHTS_FILE, sha256_file
from .output import improvement_pct

CACHE_DIR = "cache"


@dataclass
class TestScores:
    """N sequences of a split, E experts, S tokens per sequence."""

    indices: np.ndarray
    """(N,) int64 sequence index in the split."""
    domains: np.ndarray
    """(N,) int16 domain id (-1 unknown); analysis only."""
    expert_nll: np.ndarray
    """(N, E) float64 summed NLL of each whole sequence under each expert."""
    expert_logp: np.ndarray
    """(N, E, S - 1) float32 log p(x_{s+1} | x_{1:s}) under each expert."""
    dense_nll: np.ndarray | None
    """(N,) float64 summed NLL under the dense baseline (None when there is none)."""
    bytes_per_token: float | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.indices)

    @property
    def num_experts(self) -> int:
        return self.expert_nll.shape[1]

    @property
    def tokens_per_seq(self) -> int:
        return self.expert_logp.shape[2]

    def routed_nll(self, routes: np.ndarray) -> np.ndarray:
        """(N,) summed NLL of sequence n under expert routes[n]."""
        return self.expert_nll[np.arange(self.num_seqs), np.asarray(routes)]

    def ppl(self, routes: np.ndarray, select: np.ndarray | None = None) -> float:
        """Token-weighted perplexity when sequence n is scored by expert routes[n] (over `select`)."""
        nll = self.routed_nll(routes)
        if select is not None:
            nll = nll[select]
        return _ppl(float(nll.sum()), len(nll) * self.tokens_per_seq)

    def dense_ppl(self, select: np.ndarray | None = None) -> float | None:
        if self.dense_nll is None:
            return None
        nll = self.dense_nll if select is None else self.dense_nll[select]
        return _ppl(float(nll.sum()), len(nll) * self.tokens_per_seq)

    def self_scores(self, prefix_len: int) -> np.ndarray:
        """(N, E) log-likelihood of the first `prefix_len` tokens under each expert (experts as routers)."""
        check_lm_prefix_len(prefix_len, self.tokens_per_seq + 1, "the experts' sequences")
        return self.expert_logp[:, :, :prefix_len - 1].sum(axis=2, dtype=np.float64)

    def summary(self, routes: np.ndarray) -> dict:
        """ppl, dense ppl and improvement (%) of the mixture that follows `routes`."""
        ppl, dense = self.ppl(routes), self.dense_ppl()
        return {"ppl": ppl, "dense_ppl": dense,
                "improvement_pct": None if dense is None else improvement_pct(dense, ppl)}


def _ppl(nll_sum: float, num_tokens: int) -> float:
    return math.exp(min(nll_sum / max(num_tokens, 1), 700.0))


def check_lm_prefix_len(prefix_len, limit: int, limit_name: str) -> int:
    """M-hat of packed test sequences routed by LM likelihood (`rule.check_prefix_len`)."""
    return rule.check_prefix_len(prefix_len, {limit_name: limit}, where="prefix length M-hat")


def routes_from_logp(logp: np.ndarray, prefix_len: int) -> np.ndarray:
    """(N,) best expert of each sequence routed on its first `prefix_len` tokens; logp (N, E, P - 1)."""
    return rule.route(rule.window_scores(logp, prefix_len))


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
                 log: Callable[[str], None] | None = None) -> TestScores:
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
            return TestScores(z["indices"], z["domains"], z["expert_nll"], z["expert_logp"],
                              z["dense_nll"] if z["has_dense"] else None, data.bytes_per_token)
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
    scores = TestScores(indices, data.dataset.domains(indices), -expert_logp.sum(axis=2, dtype=np.float64),
                        expert_logp, dense_nll, data.bytes_per_token)
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
    from ..routing.em import load_routers
    from ..routing.score import StackedRouters
    from ..data.splits import load_split

    dev = resolve_device(device)
    models, _ = load_routers(routers_dir, device=str(dev))
    context = min(models[0].config.max_seq_len, load_split(data_dir, split).dataset.seq_len)
    check_lm_prefix_len(prefix_len, context, f"the routers' context / the sequence length of {data_dir}")
    tokens = load_split(data_dir, split).dataset.get(indices)[:, :prefix_len]
    return router_token_logprobs(StackedRouters(models, device=dev), tokens, batch_size=batch_size)
