"""Router-size analysis (paper §3.4 "Impact of router size", Figure 4a).

The same mixture (data, E, M, experts, budget) partitioned by routers of different sizes: one run
directory per router size, e.g. the `tiny`/`cpu-router` presets and a router as large as the
expert (the paper's "335M router", the expert routing for itself). For each: the router's size,
the mixture's test perplexity at M-hat = M, and the dense baseline. Between every two runs: how
much their partitions agree, on the training data (the shards) and on the test routing, as the
fraction of sequences sent to the same expert after the best one-to-one matching of expert
indices, and the adjusted Rand index. Paper finding to check: router size barely matters.

Each run also gets a "self-routing" row at no training cost: its experts, trained on the routers'
partition, route the test set by their own prefix log-likelihood instead of the routers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..mixture.scores import improvement_pct
from ..routing import rule
from ..errors import SmallTalkError
from ..data.manifest import read_data_manifest
from ..routing.routers_dir import read_routers_manifest
from .output import markdown_table, pct, pyplot, save_figure, write_analysis
from .partitions import adjusted_rand, best_matching
from .runs import RunView, ScoreSettings, open_run
from .scores import router_logp

NAME = "router-size"


def router_params(view: RunView) -> tuple[str, int]:
    """(router preset name, parameters of one router) from the run's routers manifest."""
    routers = read_routers_manifest(view.routers_dir)
    return str(routers.em.router_preset), routers.router_model.num_params()


def _check_same_experiment(views: Sequence[RunView]) -> None:
    base = views[0]
    base_data = read_data_manifest(base.data_dir)
    for v in views[1:]:
        data = read_data_manifest(v.data_dir)
        if data.tokenizer_sha256 != base_data.tokenizer_sha256 or data.num_seqs("train") != base_data.num_seqs("train"):
            raise SmallTalkError(f"{v.root}: its data differs from {base.root}'s (tokenizer or number of training "
                                 "sequences); compare runs prepared from the same data config")
        if v.num_experts != base.num_experts:
            raise SmallTalkError(f"{v.root}: {v.num_experts} experts but {base.root} has {base.num_experts}; "
                                 "compare runs with the same number of experts")


def pairwise(partitions: Sequence[np.ndarray]) -> dict[str, list[list[float]]]:
    """Symmetric (R, R) matrices of agreement-after-matching and adjusted Rand between partitions."""
    R = len(partitions)
    agree, ari = np.eye(R), np.eye(R)
    for i in range(R):
        for j in range(i + 1, R):
            agree[i, j] = agree[j, i] = best_matching(partitions[i], partitions[j])[0]
            ari[i, j] = ari[j, i] = adjusted_rand(partitions[i], partitions[j])
    return {"agreement": agree.tolist(), "adjusted_rand": ari.tolist()}


def analyze_router_size(run_dir: str | Path, compare: Sequence[tuple[str | None, str | Path]] = (),
                        cfg: ScoreSettings | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Compare `run_dir` with the runs in `compare` ((label, dir) pairs); writes ``<run>/analysis/router-size/``."""
    cfg = cfg or ScoreSettings()
    views = [open_run(run_dir)] + [open_run(d) for _, d in compare]
    labels = [None] + [label for label, _ in compare]
    for v in views:
        if v.routers_dir is None:
            raise SmallTalkError(f"{v.root}: no routers/manifest.json; the router-size analysis needs runs "
                                 "partitioned by trained routers")
    _check_same_experiment(views)
    rows, train_parts, test_parts, names = [], [], [], []
    for v, label in zip(views, labels):
        preset, params = router_params(v)
        expert_params = v.config.expert_model.replace(vocab_size=read_data_manifest(v.data_dir).vocab_size).num_params()
        name = label or f"{preset} router"
        scores = v.scores(cfg, log=log)
        M = v.prefix_len
        routes = rule.route_logp(router_logp(v.routers_dir, v.data_dir, scores.indices, M, split=cfg.split,
                                              device=cfg.device), M)
        self_routes = rule.route(scores.self_scores(M))
        dense = scores.dense_ppl()
        for kind, r in (("routers", routes), ("experts route themselves", self_routes)):
            ppl = scores.ppl(r)
            rows.append({"run": name, "run_dir": str(v.root), "router_preset": preset, "router_params": params,
                         "expert_params": expert_params, "routing": kind, "prefix_len": M, "ppl": ppl,
                         "dense_ppl": dense, "improvement_pct": None if dense is None else improvement_pct(dense, ppl),
                         "test_agreement_with_routers": float((routes == r).mean())})
        train_parts.append(v.train_assignment())
        test_parts.append(routes)
        names.append(name)
    same_test = all(len(p) == len(test_parts[0]) for p in test_parts)
    result = {"split": cfg.split, "runs": names, "rows": rows,
              "train_partition": pairwise(train_parts),
              "test_routing": pairwise(test_parts) if same_test else None}
    _write(views[0].root, result)
    return result


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def _summary(result: dict) -> str:
    routed = [r for r in result["rows"] if r["routing"] == "routers"]
    ppls = [r["ppl"] for r in routed]
    text = ("The same mixture partitioned by routers of different sizes (cf. paper Figure 4a); 'experts route "
            "themselves' re-routes the test set with the run's own experts instead of its routers. ")
    if len(routed) > 1:
        spread = 100 * (max(ppls) - min(ppls)) / min(ppls)
        A = np.asarray(result["train_partition"]["agreement"])
        off = A[~np.eye(len(A), dtype=bool)]
        text += (f"Test perplexity spread across router sizes: {spread:.2f}% ({min(ppls):.2f} to {max(ppls):.2f}); "
                 f"training partitions agree on {100 * off.min():.1f}% to {100 * off.max():.1f}% of sequences "
                 "after matching expert indices.")
    return text


def _write(run_root: Path, result: dict) -> None:
    rows = [[r["run"], f"{_millions(r['router_params'])} ({r['router_params'] / r['expert_params']:.2f}x expert)",
             r["routing"], r["prefix_len"], r["ppl"], r["dense_ppl"], pct(r["improvement_pct"]),
             f"{100 * r['test_agreement_with_routers']:.1f}%"] for r in result["rows"]]
    table = markdown_table(["run", "router params", "routing", "M-hat", "mixture ppl", "dense ppl", "vs dense",
                            "test agreement with its routers"], rows)
    names = result["runs"]
    if len(names) > 1:
        for key, title in (("train_partition", "training partition"), ("test_routing", "test routing")):
            if result.get(key):
                A, R = result[key]["agreement"], result[key]["adjusted_rand"]
                table += (f"\n\nAgreement of the {title} between runs (after matching experts; adjusted Rand in "
                          "parentheses):\n\n")
                table += markdown_table([""] + names, [[names[i]] + [f"{100 * A[i][j]:.1f}% ({R[i][j]:.2f})"
                                                                     for j in range(len(names))]
                                                       for i in range(len(names))])
    write_analysis(run_root, NAME, "Router size (cf. Figure 4a)", result, table, _summary(result),
                   plot=lambda path: plot_router_size(result, path))


def plot_router_size(result: dict, path: Path) -> Path:
    plt = pyplot()
    rows = result["rows"]
    names = result["runs"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    xs = np.arange(len(names))
    for off, kind, color in ((-0.2, "routers", "#1f5fa8"), (0.2, "experts route themselves", "#7aa6d6")):
        ys = [next(r["ppl"] for r in rows if r["run"] == n and r["routing"] == kind) for n in names]
        ax1.bar(xs + off, ys, width=0.38, color=color, label=f"mixture, {kind}")
    dense = [r["dense_ppl"] for r in rows if r["dense_ppl"] is not None]
    if dense:
        ax1.axhline(dense[0], color="#d0672a", linestyle="--", label=f"dense ({dense[0]:.2f})")
    labels = [f"{n}\n{_millions(next(r['router_params'] for r in rows if r['run'] == n))}" for n in names]
    ax1.set_xticks(xs, labels, fontsize=8)
    ax1.set_ylabel("test perplexity")
    lo = min(r["ppl"] for r in rows + [{"ppl": d} for d in dense])
    hi = max(r["ppl"] for r in rows + [{"ppl": d} for d in dense])
    ax1.set_ylim(lo - 0.15 * (hi - lo) - 1e-6, hi + 0.15 * (hi - lo) + 1e-6)
    ax1.legend(fontsize=8)
    ax1.set_title("Test perplexity by router size", fontsize=10)
    A = np.asarray(result["train_partition"]["agreement"])
    im = ax2.imshow(A, vmin=0, vmax=1, cmap="Blues")
    for i in range(len(A)):
        for j in range(len(A)):
            ax2.text(j, i, f"{100 * A[i, j]:.0f}%", ha="center", va="center", fontsize=8,
                     color="white" if A[i, j] > 0.6 else "black")
    ax2.set_xticks(xs, names, fontsize=7, rotation=30)
    ax2.set_yticks(xs, names, fontsize=7)
    ax2.set_title("Training-partition agreement (matched)", fontsize=10)
    fig.colorbar(im, ax=ax2, fraction=0.046)
    return save_figure(fig, path)
