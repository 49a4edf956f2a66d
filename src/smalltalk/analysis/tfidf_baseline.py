"""TF-IDF + balanced k-means baseline vs EM routing at equal training budget (paper §3.4, Figure 4c).

    1. decode the first M tokens of every training sequence (the prefix EM's routers see)
    2. TF-IDF -> truncated SVD -> balanced k-means into E clusters of exact, balanced sizes (tfidf.py)
    3. the clusters become expert shards; E experts train exactly like the run's own (derived.py)
    4. test sequences go to the nearest centroid of their first M-hat tokens' text, for each M-hat
    5. compared with the run's EM mixture at the same M-hat values, and with dense

Also reported: how the TF-IDF partition relates to EM's (agreement after matching experts,
adjusted Rand) and to the domains (NMI), on the training data.

Output: ``<run>/analysis/tfidf/`` (fitted router in ``router/``, derived run with experts in ``run/``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import SmallTalkError
from ..data.splits import load_split
from .baselines import (EM_LABEL, BaselineConfig, add_bootstrap, comparison_prefix_lens, comparison_table,
                        em_rows, log_to, plot_comparison, row, verdict)
from .derived import prepare_derived_run, train_derived_experts
from .output import analysis_dir, write_analysis
from .partitions import adjusted_rand, best_matching, nmi
from .runs import RunView, open_run
from .tfidf import TfidfConfig, TfidfRouter, check_prefix_len, decode_prefixes, fit_tfidf_router

NAME = "tfidf"
LABEL = "TF-IDF + balanced k-means"
_DECODE_CHUNK = 8192


@dataclass
class TfidfBaselineConfig(BaselineConfig):
    fit_prefix_len: int | None = None
    """Tokens of each training sequence whose text is clustered (None: the run's M, what EM's routers see)."""
    tfidf: dict = field(default_factory=dict)
    """Overrides of `TfidfConfig` (svd_dim, max_features, min_df, n_init, ...)."""


def tokenizer_file(view: RunView) -> Path:
    from ..data.manifest import read_data_manifest

    path = read_data_manifest(view.data_dir).tokenizer_file
    if not path.is_file():
        raise SmallTalkError(f"{path}: the run's tokenizer is missing; TF-IDF needs it to decode prefixes to text")
    return path


def prefix_texts(view: RunView, split: str, prefix_len: int, indices: np.ndarray | None = None) -> list[str]:
    """Text of the first `prefix_len` tokens of sequences of `split` (all when `indices` is None)."""
    ds = load_split(view.data_dir, split).dataset
    check_prefix_len(prefix_len, ds.seq_len, "prefix length", f"sequence length of {view.data_dir}")
    indices = np.arange(len(ds)) if indices is None else np.asarray(indices)
    tok = tokenizer_file(view)
    texts: list[str] = []
    for start in range(0, len(indices), _DECODE_CHUNK):
        rows = ds.get(indices[start:start + _DECODE_CHUNK])[:, :prefix_len]
        texts += decode_prefixes(tok, rows, prefix_len)
    return texts


def analyze_tfidf(run_dir: str | Path, cfg: TfidfBaselineConfig | None = None,
                  log: Callable[[str], None] | None = None) -> dict:
    cfg = cfg or TfidfBaselineConfig()
    say = log_to(log)
    parent = open_run(run_dir)
    seed = parent.config.seed if cfg.seed is None else cfg.seed
    E, M = parent.num_experts, parent.prefix_len
    fit_len = cfg.fit_prefix_len or M
    lens = comparison_prefix_lens(parent, cfg)  # validates M-hat before any long work

    tcfg = TfidfConfig(**{"num_clusters": E, "seed": seed, **cfg.tfidf})
    texts = prefix_texts(parent, "train", fit_len)
    say(f"tfidf: clustering {len(texts)} training prefixes of {fit_len} tokens into {E} balanced clusters")
    router, clustering = fit_tfidf_router(texts, tcfg)
    del texts
    router.save(analysis_dir(parent.root, NAME) / "router")
    valid_routes = router.route(prefix_texts(parent, "valid", fit_len))
    root = prepare_derived_run(parent, NAME, clustering.labels, valid_routes,
                               {"method": "tfidf", "fit_prefix_len": fit_len, "tfidf": tcfg.to_dict()})
    derived = train_derived_experts(root, log=say) if cfg.train else open_run(root)

    base = parent.scores(cfg, log=say)
    mine = derived.scores(cfg, log=say)
    dense = base.dense_ppl()
    rows, em_nll = em_rows(parent, base, lens, cfg)
    routes_at = {m: route_tfidf(router, parent, cfg.split, base.indices, m) for m in lens}
    rows += [row(LABEL, m, mine.ppl(routes_at[m]), dense) for m in lens]
    add_bootstrap(rows, LABEL, em_nll, {m: mine.routed_nll(r) for m, r in routes_at.items()})
    if dense is not None:
        rows.append(row("dense", None, dense, dense))

    em_train = parent.train_assignment()
    train_domains = load_split(parent.data_dir, "train").dataset.domains()
    known = train_domains >= 0
    partition = {"agreement_with_em": best_matching(em_train, clustering.labels)[0],
                 "adjusted_rand_with_em": adjusted_rand(em_train, clustering.labels),
                 "nmi_domain_tfidf": nmi(clustering.labels[known], train_domains[known]) if known.any() else None,
                 "nmi_domain_em": nmi(em_train[known], train_domains[known]) if known.any() else None,
                 "cluster_sizes": np.bincount(clustering.labels, minlength=E).tolist(),
                 "kmeans_iterations": clustering.iterations, "kmeans_converged": clustering.converged,
                 "svd_dim": int(router.components.shape[0]), "vocabulary": len(router.vocabulary)}
    result = {"split": cfg.split, "seed": seed, "num_experts": E, "prefix_len": M, "fit_prefix_len": fit_len,
              "num_seqs": base.num_seqs, "tfidf": tcfg.to_dict(), "partition": partition,
              "derived_run": str(root), "rows": rows}
    nmi_txt = ""
    if partition["nmi_domain_tfidf"] is not None:
        nmi_txt = (f" NMI with the domains: TF-IDF {partition['nmi_domain_tfidf']:.3f}, EM "
                   f"{partition['nmi_domain_em']:.3f}.")
    summary = (f"Experts trained on TF-IDF + SVD + balanced k-means clusters of the first {fit_len} tokens "
               "(the c-BTM recipe; same expert budget as the run's), test sequences routed to the nearest "
               "centroid of their first M-hat tokens (cf. paper Figure 4c). "
               + verdict(rows, LABEL, sorted({32, M} & set(lens))) + ". The TF-IDF training partition agrees "
               f"with EM's on {100 * partition['agreement_with_em']:.1f}% of sequences after matching experts "
               f"(adjusted Rand {partition['adjusted_rand_with_em']:.3f})." + nmi_txt)
    write_analysis(parent.root, NAME, "TF-IDF routing baseline (cf. Figure 4c)", result, comparison_table(rows),
                   summary, plot=lambda path: plot_comparison([r for r in rows if r["method"] in (EM_LABEL, LABEL)],
                                                              path, "EM routing vs TF-IDF routing",
                                                              {"dense": dense}))
    return result


def route_tfidf(router: TfidfRouter, view: RunView, split: str, indices: np.ndarray, prefix_len: int) -> np.ndarray:
    """(N,) nearest centroid of the text of each sequence's first `prefix_len` tokens."""
    return router.route(prefix_texts(view, split, prefix_len, indices))
