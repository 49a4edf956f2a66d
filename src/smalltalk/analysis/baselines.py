"""What the TF-IDF baseline and the random-shard control share: their settings, the comparison with
the run's own EM mixture and dense model over routing prefix lengths, the table and the plot."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..mixture.scores import SequenceScores, improvement_pct
from ..routing import rule
from .output import markdown_table, pct, pyplot, save_figure
from .prefix_length import default_prefix_lens, router_context
from .runs import PrefixSettings, RunView
from .scores import check_lm_prefix_len, router_logp

EM_LABEL = "EM routers (the run)"


@dataclass
class BaselineConfig(PrefixSettings):
    """The prefix settings, plus the baseline partition's seed and whether to train its experts."""

    seed: int | None = None
    """Seed of the baseline's partition (None: the run's seed)."""
    train: bool = True
    """Train the baseline's experts (resumable); False only evaluates experts already trained."""


def comparison_prefix_lens(parent: RunView, cfg: BaselineConfig) -> list[int]:
    context = router_context(parent)
    lens = cfg.prefix_lens or default_prefix_lens(parent.prefix_len, context)
    return sorted({check_lm_prefix_len(m, context, f"the routers' context in {parent.root}") for m in lens})


def em_rows(parent: RunView, scores: SequenceScores, prefix_lens: list[int],
            cfg: BaselineConfig) -> tuple[list[dict], dict[int, np.ndarray]]:
    """The run's own mixture (EM routers) at each M-hat: table rows, and per M-hat the (N,) NLL per sequence."""
    logp = router_logp(parent.routers_dir, parent.data_dir, scores.indices, max(prefix_lens), split=cfg.split,
                       device=cfg.device)
    routes = {m: rule.route_logp(logp, m) for m in prefix_lens}
    rows = [row(EM_LABEL, m, scores.ppl(routes[m]), scores.dense_ppl()) for m in prefix_lens]
    return rows, {m: scores.routed_nll(routes[m]) for m in prefix_lens}


def paired_bootstrap(nll_a: np.ndarray, nll_b: np.ndarray, num_samples: int = 2000, seed: int = 0) -> float:
    """Fraction of bootstrap resamples of the test sequences on which `a` has the lower total NLL (i.e. the
    lower perplexity: every sequence has the same number of tokens). A cheap measure of spread: ~1.0 or
    ~0.0 means the difference is not an accident of which test sequences were drawn."""
    diff = np.asarray(nll_a, dtype=np.float64) - np.asarray(nll_b, dtype=np.float64)  # (N,)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diff), size=(num_samples, len(diff)))
    return float((diff[idx].sum(axis=1) < 0).mean())


def add_bootstrap(rows: list[dict], method: str, em_nll: dict[int, np.ndarray], nll: dict[int, np.ndarray]) -> None:
    """Annotate `method`'s rows with P(EM better) at the same M-hat."""
    for r in rows:
        if r["method"] == method and r["prefix_len"] in em_nll:
            r["p_em_better"] = paired_bootstrap(em_nll[r["prefix_len"]], nll[r["prefix_len"]])


def row(method: str, prefix_len: int | None, ppl: float, dense_ppl: float | None) -> dict:
    return {"method": method, "prefix_len": prefix_len, "ppl": ppl, "dense_ppl": dense_ppl,
            "improvement_pct": None if dense_ppl is None else improvement_pct(dense_ppl, ppl)}


def comparison_table(rows: list[dict]) -> str:
    return markdown_table(["method", "M-hat", "test ppl", "dense ppl", "vs dense", "P(EM better), bootstrap"],
                          [[r["method"], "–" if r["prefix_len"] is None else r["prefix_len"], r["ppl"],
                            r["dense_ppl"], pct(r["improvement_pct"]),
                            f"{r['p_em_better']:.3f}" if "p_em_better" in r else "–"] for r in rows])


def verdict(rows: list[dict], method: str, at: list[int]) -> str:
    """'EM x vs <method> y at M-hat = m' for each m in `at` present in both."""
    out = []
    for m in at:
        em = next((r for r in rows if r["method"] == EM_LABEL and r["prefix_len"] == m), None)
        other = next((r for r in rows if r["method"] == method and r["prefix_len"] == m), None)
        if em and other:
            better = "EM better" if em["ppl"] < other["ppl"] else f"{method} better"
            boot = f", EM better in {100 * other['p_em_better']:.1f}% of bootstrap resamples" \
                if "p_em_better" in other else ""
            out.append(f"M-hat = {m}: EM {em['ppl']:.2f} vs {method} {other['ppl']:.2f} ({better}{boot})")
    return "; ".join(out)


def plot_comparison(rows: list[dict], path: Path, title: str, flat: dict[str, float] | None = None) -> Path:
    """ppl vs M-hat, one line per method; `flat` adds horizontal reference lines (e.g. dense)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    methods = list(dict.fromkeys(r["method"] for r in rows if r["prefix_len"] is not None))
    for method in methods:
        pts = sorted((r["prefix_len"], r["ppl"]) for r in rows if r["method"] == method and r["prefix_len"])
        ax.plot(*zip(*pts), "o-", label=method)
    styles = iter(["--", ":", "-."])
    for name, value in (flat or {}).items():
        if value is not None:
            ax.axhline(value, linestyle=next(styles, "--"), color="black", alpha=0.6, label=f"{name} ({value:.2f})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("routing prefix length M-hat (tokens)")
    ax.set_ylabel("test perplexity")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return save_figure(fig, path)


def log_to(log: Callable[[str], None] | None) -> Callable[[str], None]:
    return log if log is not None else (lambda msg: None)


def seeded_random_routes(num_seqs: int, num_experts: int, seed: int) -> np.ndarray:
    """A uniformly random expert per sequence: routing that carries no information."""
    return np.random.default_rng([seed, 7]).integers(0, num_experts, num_seqs)
