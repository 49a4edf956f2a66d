"""The routing rule of the paper (§2.3, Eq. 4-8), in one place.

A sequence x is routed by its first M tokens (the routing window). Router e scores the window by its
log-likelihood (Eq. 8, the negative of Eq. 9's prefix loss)::

    score_e(x) = log p(x_{1:M} | theta^{r,e}) = sum_{s=1}^{M-1} log p(x_{s+1} | x_{1:s}; theta^{r,e})

With a uniform prior over experts, the posterior over experts is the softmax of the scores (Eq. 4-6),
and the sequence goes to the single best expert, argmax_e score_e (Eq. 7); ties go to the lower index.

Windows. A sequence from packed data (sharding, evaluation, analyses) is routed on its first M tokens
as they are, exactly as the routers were trained. A prompt (serving, generation, lm-eval) is routed on
EOS followed by its first M-hat tokens, since every training document followed an EOS; a prompt that
already starts with EOS keeps that one boundary, and a prompt with no tokens goes to the bundle's
fallback expert. Either way the window is 2..context tokens long: `check_prefix_len` is the one
validator (`offset=1` for prompt windows, which add the EOS).

The batched forward of E routers that produces the per-token log-probabilities is `score.StackedRouters`.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from ..errors import SmallTalkError


def check_prefix_len(prefix_len, limits: Mapping[str, int | None] | None = None, *, where: str = "prefix_len",
                     offset: int = 0) -> int:
    """A routing prefix of `prefix_len` tokens (plus `offset` boundary tokens) must score at least one
    prediction, so the window is >= 2 tokens, and fit every limit ({what: tokens})."""
    if isinstance(prefix_len, bool) or not isinstance(prefix_len, (int, np.integer)):
        raise SmallTalkError(f"{where}={prefix_len!r} must be an integer")
    low = 2 - offset
    if prefix_len < low:
        raise SmallTalkError(f"{where}={prefix_len} must be >= {low}: the routing window scores its tokens 2..end, "
                             f"so it needs at least two (an integer >= {low})")
    for what, limit in (limits or {}).items():
        if limit is not None and prefix_len + offset > limit:
            raise SmallTalkError(f"{where}={prefix_len} is longer than {what} ({limit - offset} tokens); use a prefix "
                                 f"of at most {limit - offset} tokens")
    return int(prefix_len)


def window_scores(logp: np.ndarray, prefix_len: int) -> np.ndarray:
    """Eq. 8 from per-token log-probs: logp (N, E, T - 1) of tokens 2..T -> (N, E) float64 scores of the first
    `prefix_len` tokens."""
    check_prefix_len(prefix_len, {"the scored prefix": logp.shape[2] + 1})
    return logp[:, :, :prefix_len - 1].sum(axis=2, dtype=np.float64)


def masked_scores(logp: np.ndarray, lengths: Sequence[int]) -> np.ndarray:
    """Eq. 8 for right-padded windows of different lengths: logp (N, E, T - 1), lengths (N,) -> (N, E)."""
    keep = np.arange(logp.shape[2])[None, None, :] < (np.asarray(lengths)[:, None, None] - 1)
    return np.where(keep, logp, 0.0).sum(axis=2, dtype=np.float64)


def route(scores: np.ndarray) -> np.ndarray:
    """Eq. 7: the best expert per sequence, scores (N, E) -> (N,) int64 (ties: the lower index)."""
    return np.asarray(scores).argmax(axis=-1).astype(np.int64)


def route_logp(logp: np.ndarray, prefix_len: int) -> np.ndarray:
    """Eq. 7-8 from per-token log-probs: logp (N, E, T - 1) -> (N,) best expert on the first `prefix_len` tokens."""
    return route(window_scores(logp, prefix_len))


def posterior(scores: np.ndarray) -> np.ndarray:
    """Eq. 4-6 with a uniform prior: p(e | window) = softmax over e of the scores, along the last axis."""
    z = np.asarray(scores, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=-1, keepdims=True)


def prompt_window(ids: Sequence[int], eos_id: int, prefix_len: int) -> list[int]:
    """The routing window of a prompt: EOS + its first `prefix_len` tokens ([] when it has none)."""
    ids = list(ids)
    if ids and ids[0] == eos_id:
        ids = ids[1:]  # the prompt brings its own document boundary: do not double it
    return [eos_id] + ids[:prefix_len] if ids else []
