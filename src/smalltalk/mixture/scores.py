"""Per-sequence scores of a mixture's models on packed test sequences, and the perplexities they give.

One pass of every expert (and of the dense model) over N sequences answers every "which expert would
this sequence go to under rule X, and what is the perplexity then?" question: `SequenceScores` keeps,
per sequence, the summed NLL under each expert and the dense model, and optionally the routers' and the
experts' per-token log-probs. Mixture evaluation (`mixture/evaluate.py`), the opt-out cost
(`mixture/shrink.py`) and the routing analyses (`analysis/`) all read it.

Perplexity is token-weighted (`train.evaluate.perplexity`): exp(summed NLL / predicted tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..routing import rule
from ..train.evaluate import perplexity


def improvement_pct(dense_ppl: float, ppl: float) -> float:
    """How much lower `ppl` is than dense, in % of dense (positive = better than dense)."""
    return 100.0 * (dense_ppl - ppl) / dense_ppl


@dataclass
class SequenceScores:
    """N packed sequences of S tokens (S - 1 predicted), E experts."""

    expert_nll: np.ndarray
    """(N, E) float64 summed NLL of each whole sequence under each expert."""
    dense_nll: np.ndarray | None
    """(N,) float64 summed NLL under the dense baseline (None when there is none)."""
    domains: np.ndarray
    """(N,) int16 domain id (-1 unknown); analysis only."""
    tokens_per_seq: int
    """Predicted tokens per sequence (S - 1)."""
    router_logp: np.ndarray | None = None
    """(N, E, M - 1) float32 router log-probs of prefix tokens 2..M."""
    expert_logp: np.ndarray | None = None
    """(N, E, S - 1) float32 log p(x_{s+1} | x_{1:s}) under each expert (soft mixing, experts as routers)."""
    indices: np.ndarray | None = None
    """(N,) int64 index of each sequence in its split."""
    bytes_per_token: float | None = None

    @property
    def num_seqs(self) -> int:
        return self.expert_nll.shape[0]

    @property
    def num_experts(self) -> int:
        return self.expert_nll.shape[1]

    def routes(self, prefix_len: int) -> np.ndarray:
        """(N,) the routers' choice on each sequence's first `prefix_len` tokens (Eq. 7-8)."""
        return rule.route(self.router_scores(prefix_len))

    def router_scores(self, prefix_len: int) -> np.ndarray:
        """(N, E) Eq. 8 scores of each sequence's first `prefix_len` tokens under each router."""
        if self.router_logp is None:
            raise ValueError("these scores were computed without the routers")
        return rule.window_scores(self.router_logp, prefix_len)

    def self_scores(self, prefix_len: int) -> np.ndarray:
        """(N, E) log-likelihood of the first `prefix_len` tokens under each expert (experts as routers)."""
        if self.expert_logp is None:
            raise ValueError("these scores were computed without the experts' per-token log-probs")
        rule.check_prefix_len(prefix_len, {"the experts' sequences": self.tokens_per_seq + 1},
                              where="prefix length M-hat")
        return rule.window_scores(self.expert_logp, prefix_len)

    def routed_nll(self, routes: np.ndarray) -> np.ndarray:
        """(N,) summed NLL of sequence n under expert routes[n]."""
        return self.expert_nll[np.arange(self.num_seqs), np.asarray(routes)]

    def ppl(self, routes: np.ndarray, select: np.ndarray | None = None) -> float | None:
        """Perplexity when sequence n is scored by expert routes[n] (over `select`; None if it is empty)."""
        nll = self.routed_nll(routes)
        nll = nll if select is None else nll[select]
        return perplexity(float(nll.sum()), len(nll) * self.tokens_per_seq) if len(nll) else None

    def dense_ppl(self, select: np.ndarray | None = None) -> float | None:
        if self.dense_nll is None:
            return None
        nll = self.dense_nll if select is None else self.dense_nll[select]
        return perplexity(float(nll.sum()), len(nll) * self.tokens_per_seq) if len(nll) else None

    def summary(self, routes: np.ndarray) -> dict:
        """ppl, dense ppl and improvement (%) of the mixture that follows `routes`."""
        ppl, dense = self.ppl(routes), self.dense_ppl()
        return {"ppl": ppl, "dense_ppl": dense,
                "improvement_pct": None if dense is None else improvement_pct(dense, ppl)}
