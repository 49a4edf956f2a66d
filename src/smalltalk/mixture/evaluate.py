"""Test perplexity of the mixture vs the dense baseline (paper §3.2, Figures 2, 4b and 5).

Each test sequence is routed by its first M-hat tokens (argmax of router prefix log-likelihood, no
balancing) and scored whole by the chosen expert; the mixture's perplexity is
exp(sum of NLL over every predicted token / number of predicted tokens), token-weighted like
`train.evaluate`. The dense baseline is scored on the same sequences.

Every expert scores every test sequence once, so the (sequence, expert) NLL table answers all the
questions at the cost of E forward passes over the test set:

* the mixture at the routers' M and at shorter M-hat (Figure 4b; router log-probs are cumulated);
* per expert (Figure 5): its share of the test data, its perplexity on its segment vs the dense
  model's perplexity on the same segment;
* the full expert x segment perplexity matrix (does expert e beat the others on its own segment?);
* an oracle that picks the best expert per sequence after seeing it (an upper bound on routing);
* optional top-k soft mixing beyond the paper (c-BTM style): next-token distribution
  sum_{e in top-k} w_e p_e(x_{s+1} | x_{1:s}), w = router posterior renormalised over the top k.

Only one expert is in memory at a time. Bits per byte use the split's byte count from the data
manifest (see train/evaluate.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import SmallTalkError
from ..model.io import load_model_dir
from ..data.manifest import read_data_manifest
from ..data.splits import evenly_spaced, load_split
from ..routing import rule
from .inference import Mixture, router_token_logprobs, token_logprobs
from .scores import SequenceScores, improvement_pct, perplexity


@dataclass
class EvalConfig:
    split: str = "test"
    """Split of the prepared data to evaluate on."""
    max_seqs: int = 0
    """Evaluate an evenly spaced subset of this many sequences (0: the whole split)."""
    batch_size: int = 16
    """Sequences per forward pass."""
    prefix_lens: list[int] = field(default_factory=list)
    """Extra routing prefix lengths M-hat to report (Figure 4b); the routers' M is always included."""
    top_k: int = 2
    """Also report top-k soft mixing weighted by the router posterior (0: off)."""
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.max_seqs < 0 or self.batch_size < 1 or self.top_k < 0:
            raise SmallTalkError(f"eval config: max_seqs={self.max_seqs} must be >= 0, batch_size={self.batch_size} "
                                 f">= 1, top_k={self.top_k} >= 0")
        self.prefix_lens = [rule.check_prefix_len(m, where="eval config: prefix_lens entry") for m in self.prefix_lens]


def score_tables(mixture: Mixture, dense_dir: str | Path, tokens: np.ndarray, domains: np.ndarray, *,
                 batch_size: int = 16, keep_token_logp: bool = False, progress=None) -> SequenceScores:
    """Run the routers, every expert and the dense model over `tokens` (N, S)."""
    N, S = tokens.shape
    M = mixture.info.prefix_len
    if M > S:
        raise SmallTalkError(f"the bundle routes on M={M} tokens but the test sequences have only {S}; evaluate on "
                             "data prepared with the bundle's seq_len")
    from ..progress import progress as progress_bar

    E = mixture.num_experts
    # Sequences x models scored: a bar on terminals, a line every few seconds in logs.
    bar = progress_bar(total=N * (E + 2), desc="eval-mixture", unit="seq")
    router_logp = router_token_logprobs(mixture.routers, tokens[:, :M], batch_size=batch_size * 4,
                                        on_batch=bar.update)  # (N, E, M-1)
    expert_nll = np.zeros((N, E), dtype=np.float64)
    expert_logp = np.zeros((N, E, S - 1), dtype=np.float32) if keep_token_logp else None
    for e in range(E):
        logp = token_logprobs(mixture.expert(e), tokens, batch_size=batch_size, device=mixture.device,
                              on_batch=bar.update)  # (N, S-1)
        expert_nll[:, e] = -logp.sum(axis=1, dtype=np.float64)
        _check_finite(expert_nll[:, e], f"expert {e} of {mixture.info.root}")
        if expert_logp is not None:
            expert_logp[:, e] = logp
        if progress is not None:
            progress(f"expert {e}")
    dense, _ = load_model_dir(dense_dir, device=mixture.device)
    if dense.config.vocab_size != mixture.info.vocab_size:
        raise SmallTalkError(f"{dense_dir}: dense model vocabulary {dense.config.vocab_size} differs from the "
                             f"bundle's ({mixture.info.vocab_size}); compare models trained on the same data")
    dense_nll = -token_logprobs(dense, tokens, batch_size=batch_size, device=mixture.device,
                                on_batch=bar.update).sum(axis=1, dtype=np.float64)
    bar.close()
    del dense
    _check_finite(dense_nll, f"the dense model {dense_dir}")
    _check_finite(router_logp, f"the routers of {mixture.info.root}")
    if progress is not None:
        progress("dense")
    return SequenceScores(expert_nll, dense_nll, np.asarray(domains), S - 1, router_logp=router_logp,
                          expert_logp=expert_logp)


def _check_finite(values: np.ndarray, what: str) -> None:
    if not np.isfinite(values).all():
        raise SmallTalkError(f"{what} gives NaN or infinite log-likelihoods on the test split; its weights are damaged "
                             "or it diverged: re-train it")


def soft_topk_nll(tables: SequenceScores, scores: np.ndarray, k: int) -> float:
    """Summed NLL of top-k soft mixing: -sum_s log sum_{e in topk} w_e p_e(x_{s+1})."""
    assert tables.expert_logp is not None
    k = min(k, scores.shape[1])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # (N, k)
    top_scores = np.take_along_axis(scores, top, axis=1)  # (N, k)
    log_w = top_scores - top_scores.max(axis=1, keepdims=True)
    log_w = log_w - np.log(np.exp(log_w).sum(axis=1, keepdims=True))  # (N, k) log posterior over the top k
    logp = np.take_along_axis(tables.expert_logp, top[:, :, None], axis=1)  # (N, k, S-1)
    mixed = log_w[:, :, None] + logp.astype(np.float64)
    peak = mixed.max(axis=1, keepdims=True)
    return float(-(peak[:, 0] + np.log(np.exp(mixed - peak).sum(axis=1))).sum())


def summarize(tables: SequenceScores, *, prefix_len: int, prefix_lens: list[int] = (), top_k: int = 0,
              train_shares: list[float | None] | None = None, domain_names: list[str] | None = None,
              bytes_per_token: float | None = None) -> dict:
    """The metrics of the module docstring from the score tables (pure numpy, exact)."""
    N, E = tables.expert_nll.shape
    T = tables.tokens_per_seq
    scores = tables.router_scores(prefix_len)  # (N, E)
    routes = rule.route(scores)
    rows = np.arange(N)
    mix_nll = tables.expert_nll[rows, routes]  # (N,)

    def metrics(nll_sum: float, num_tokens: int) -> dict:
        loss = nll_sum / max(num_tokens, 1)
        out = {"loss": loss, "ppl": perplexity(nll_sum, num_tokens)}
        if bytes_per_token:
            out["bpb"] = nll_sum / math.log(2) / (num_tokens * bytes_per_token)
        return out

    dense = metrics(float(tables.dense_nll.sum()), N * T)
    mixture = metrics(float(mix_nll.sum()), N * T)
    per_expert = []
    for e in range(E):
        seg = routes == e
        n = int(seg.sum())
        row = {"expert": e, "num_seqs": n, "share": n / N,
               "train_share": (train_shares or [None] * E)[e],
               "expert_ppl": perplexity(float(mix_nll[seg].sum()), n * T) if n else None,
               "dense_ppl": perplexity(float(tables.dense_nll[seg].sum()), n * T) if n else None}
        row["improvement_pct"] = improvement_pct(row["dense_ppl"], row["expert_ppl"]) if n else None
        per_expert.append(row)
    # cross[e][k]: expert e's perplexity on the segment routed to k.
    cross = [[perplexity(float(tables.expert_nll[routes == k, e].sum()), int((routes == k).sum()) * T)
              if (routes == k).any() else None for k in range(E)] for e in range(E)]
    sweep = []
    M_max = tables.router_logp.shape[2] + 1
    for m in sorted(set(list(prefix_lens) + [prefix_len])):
        if m > M_max:
            raise SmallTalkError(f"eval prefix length {m} is longer than the routing prefix M={M_max} the "
                                 "routers were trained with; M-hat must be <= M")
        r = tables.routes(m)
        ppl = perplexity(float(tables.expert_nll[rows, r].sum()), N * T)
        sweep.append({"prefix_len": m, "ppl": ppl, "improvement_pct": improvement_pct(dense["ppl"], ppl),
                      "agreement": float((r == routes).mean())})
    oracle_ppl = perplexity(float(tables.expert_nll.min(axis=1).sum()), N * T)
    result = {
        "num_seqs": N, "num_tokens": N * T, "num_experts": E, "prefix_len": prefix_len,
        "mixture": mixture, "dense": dense, "improvement_pct": improvement_pct(dense["ppl"], mixture["ppl"]),
        "per_expert": per_expert,
        "all_experts_beat_dense_on_their_segment": all(r["improvement_pct"] is None or r["improvement_pct"] > 0
                                                       for r in per_expert),
        "cross_ppl": cross, "prefix_sweep": sweep,
        "oracle": {"ppl": oracle_ppl, "improvement_pct": improvement_pct(dense["ppl"], oracle_ppl),
                   "agreement": float((tables.expert_nll.argmin(axis=1) == routes).mean())},
    }
    if top_k and top_k > 1 and tables.expert_logp is not None:
        ppl = perplexity(soft_topk_nll(tables, scores, top_k), N * T)
        result["soft_topk"] = {"k": min(top_k, E), "ppl": ppl, "improvement_pct": improvement_pct(dense["ppl"], ppl)}
    if domain_names is not None and (tables.domains >= 0).any():
        counts = np.zeros((len(domain_names), E), dtype=np.int64)
        for d, e in zip(tables.domains, routes):
            if 0 <= d < len(domain_names):
                counts[d, e] += 1
        result["domains"] = {"names": list(domain_names), "counts": counts.tolist()}
    return result


def evaluate_mixture(bundle: str | Path | Mixture, dense_dir: str | Path, data_dir: str | Path,
                     cfg: EvalConfig | None = None, progress=None) -> dict:
    """Score the mixture in `bundle` and the dense model in `dense_dir` on a split of `data_dir`."""
    cfg = cfg or EvalConfig()
    mixture = bundle if isinstance(bundle, Mixture) else Mixture.load(bundle, device=cfg.device)
    split = load_split(data_dir, cfg.split)
    if split.tokenizer_sha256 and mixture.info.tokenizer_sha256 and \
            split.tokenizer_sha256 != mixture.info.tokenizer_sha256:
        raise SmallTalkError(f"{data_dir}: data tokenizer {split.tokenizer_sha256[:12]} differs from the bundle's "
                             f"{mixture.info.tokenizer_sha256[:12]}; evaluate on data prepared with the bundle's "
                             "tokenizer")
    indices = evenly_spaced(len(split.dataset), cfg.max_seqs)
    tokens = split.dataset.get(indices)  # (N, S)
    domains = split.dataset.domains(indices)
    tables = score_tables(mixture, dense_dir, tokens, domains, batch_size=cfg.batch_size,
                          keep_token_logp=cfg.top_k > 1, progress=progress)
    result = summarize(tables, prefix_len=mixture.info.prefix_len, prefix_lens=cfg.prefix_lens, top_k=cfg.top_k,
                       train_shares=[x.train_share for x in mixture.info.experts],
                       domain_names=read_data_manifest(data_dir).domains, bytes_per_token=split.bytes_per_token)
    result["split"] = cfg.split
    result["split_num_seqs"] = len(split.dataset)
    result["config"] = asdict(cfg)
    return result
