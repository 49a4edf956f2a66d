"""Do experts specialise? (paper §3.4 "Experts do specialize", Figure 5.)

Per expert: its share of the training data (the sharding stage's balanced partition) and of the
test data (routed at inference, no capacities), the domains it receives most, and its test
perplexity on its routed segment next to the dense model's on the same segment. For the whole
routing: normalised mutual information between expert and domain, on the training partition and
on the test routing. Domain labels are used here only; routing never reads them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..mixture.scores import SequenceScores, improvement_pct
from ..routing import rule
from .output import markdown_table, pct, pyplot, save_figure, write_analysis
from .partitions import nmi
from .runs import ScoreSettings, open_run
from .scores import router_logp

NAME = "specialisation"
TOP_DOMAINS = 3


def domain_table(assignment: np.ndarray, domains: np.ndarray, num_experts: int, num_domains: int) -> np.ndarray:
    """(E, D) sequences of each domain per expert; unknown domains (-1) are left out."""
    known = np.asarray(domains) >= 0
    table = np.zeros((num_experts, max(1, num_domains)), dtype=np.int64)
    np.add.at(table, (np.asarray(assignment)[known], np.asarray(domains)[known].astype(np.int64)), 1)
    return table


def top_domains(row: np.ndarray, names: Sequence[str], k: int = TOP_DOMAINS) -> list[dict]:
    total = row.sum()
    order = np.argsort(-row, kind="stable")[:k]
    return [{"domain": names[d] if d < len(names) else str(d), "share": float(row[d] / total)}
            for d in order if total and row[d] > 0]


def _nmi_known(assignment: np.ndarray, domains: np.ndarray) -> float | None:
    known = np.asarray(domains) >= 0
    if known.sum() < 2:
        return None
    return nmi(np.asarray(assignment)[known], np.asarray(domains)[known].astype(np.int64))


def specialisation(scores: SequenceScores, test_routes: np.ndarray, train_assignment: np.ndarray | None,
                   train_domains: np.ndarray | None, domain_names: Sequence[str]) -> dict:
    """The per-expert table and NMIs of the module docstring (pure numpy)."""
    E, D = scores.num_experts, len(domain_names)
    test_table = domain_table(test_routes, scores.domains, E, D)
    train_table = None
    if train_assignment is not None and train_domains is not None:
        train_table = domain_table(train_assignment, train_domains, E, D)
    experts = []
    for e in range(E):
        seg = test_routes == e
        n = int(seg.sum())
        ppl = scores.ppl(test_routes, seg) if n else None
        dense = scores.dense_ppl(seg) if n else None
        experts.append({
            "expert": e,
            "train_share": None if train_assignment is None else float((train_assignment == e).mean()),
            "test_share": n / scores.num_seqs,
            "train_top_domains": top_domains(train_table[e], domain_names) if train_table is not None else [],
            "test_top_domains": top_domains(test_table[e], domain_names),
            "expert_ppl": ppl, "dense_ppl": dense,
            "improvement_pct": improvement_pct(dense, ppl) if n and dense is not None else None,
        })
    return {
        "experts": experts,
        "nmi_train": None if train_assignment is None or train_domains is None
        else _nmi_known(train_assignment, train_domains),
        "nmi_test": _nmi_known(test_routes, scores.domains),
        "domains": list(domain_names),
        "train_domain_table": None if train_table is None else train_table.tolist(),
        "test_domain_table": test_table.tolist(),
        "all_experts_beat_dense": all(x["improvement_pct"] is None or x["improvement_pct"] > 0 for x in experts),
        "mixture_ppl": scores.ppl(test_routes), "dense_ppl": scores.dense_ppl(),
    }


def analyze_specialisation(run_dir: str | Path, cfg: ScoreSettings | None = None,
                           log: Callable[[str], None] | None = None) -> dict:
    """Specialisation of a finished run's experts; writes ``<run>/analysis/specialisation/``."""
    from ..data.splits import load_split

    cfg = cfg or ScoreSettings()
    view = open_run(run_dir)
    scores = view.scores(cfg, log=log)
    M = view.prefix_len
    logp = router_logp(view.routers_dir, view.data_dir, scores.indices, M, split=cfg.split, device=cfg.device)
    routes = rule.route_logp(logp, M)
    train_assignment = view.train_assignment()
    train_domains = load_split(view.data_dir, "train").dataset.domains()
    result = specialisation(scores, routes, train_assignment, train_domains, view.domain_names())
    result.update(split=cfg.split, prefix_len=M, num_seqs=scores.num_seqs, run=view.label)
    _write(view.root, result)
    return result


def _fmt_top(items: list[dict]) -> str:
    return ", ".join(f"{x['domain']} {100 * x['share']:.0f}%" for x in items) or "–"


def _write(run_root: Path, result: dict) -> None:
    rows = [[x["expert"], "–" if x["train_share"] is None else f"{100 * x['train_share']:.1f}%",
             f"{100 * x['test_share']:.1f}%", _fmt_top(x["train_top_domains"]), x["expert_ppl"], x["dense_ppl"],
             pct(x["improvement_pct"])] for x in result["experts"]]
    table = markdown_table(["expert", "train share", "test share", "top training domains", "expert ppl (segment)",
                            "dense ppl (segment)", "vs dense"], rows)
    nmi_txt = ", ".join(f"{k} {result[key]:.3f}" for k, key in (("training partition", "nmi_train"),
                                                                 ("test routing", "nmi_test"))
                        if result.get(key) is not None)
    summary = (f"Per expert: data shares, the domains it receives (labels used for analysis only), and its test "
               f"perplexity on the test sequences routed to it (M-hat = {result['prefix_len']}) next to the dense "
               f"model's on the same sequences (cf. paper Figure 5). Every expert beats dense on its segment: "
               f"**{result['all_experts_beat_dense']}**. NMI(expert, domain): {nmi_txt or 'no domain labels'}.")
    write_analysis(run_root, NAME, "Expert specialisation (cf. Figure 5)", result, table, summary,
                   plot=lambda path: plot_specialisation(result, path))


def plot_specialisation(result: dict, path: Path) -> Path:
    plt = pyplot()
    experts = result["experts"]
    E = len(experts)
    table = result["train_domain_table"] or result["test_domain_table"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    xs = np.arange(E)
    shares = np.array([x["test_share"] for x in experts])
    for i, x in enumerate(experts):
        if x["expert_ppl"] is None:
            continue
        alpha = 0.35 + 0.65 * shares[i] / max(shares.max(), 1e-9)
        ax1.bar(i, x["dense_ppl"], width=0.7, color="#d0672a", alpha=0.35, label="dense" if i == 0 else None)
        ax1.bar(i, x["expert_ppl"], width=0.45, color="#1f5fa8", alpha=alpha, label="expert" if i == 0 else None)
        ax1.text(i, x["expert_ppl"], f"{100 * shares[i]:.0f}%", ha="center", va="bottom", fontsize=8)
    ax1.set_xticks(xs, [f"segment {e}" for e in range(E)])
    ax1.set_ylabel("test perplexity on the routed segment")
    ax1.set_title("Expert vs dense per routed segment (label: test share)", fontsize=10)
    ax1.legend(fontsize=8, loc="lower right")
    table = np.asarray(table, dtype=np.float64)
    frac = table / np.maximum(table.sum(axis=1, keepdims=True), 1)
    bottom = np.zeros(E)
    cmap = plt.get_cmap("tab10")
    for d, name in enumerate(result["domains"] or ["unknown"]):
        ax2.bar(xs, frac[:, d], bottom=bottom, color=cmap(d % 10), label=name)
        bottom += frac[:, d]
    ax2.set_xticks(xs, [f"expert {e}" for e in range(E)])
    ax2.set_ylabel("fraction of the expert's sequences")
    which = "training partition" if result["train_domain_table"] else "test routing"
    ax2.set_title(f"Domains per expert ({which}; NMI {result.get('nmi_train') or result.get('nmi_test') or 0:.2f})",
                  fontsize=10)
    ax2.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    return save_figure(fig, path)
