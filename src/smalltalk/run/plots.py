"""PNG figures of a run, in the style of the paper (matplotlib, Agg backend, no display needed).

* `plot_ppl_vs_flops` (Figure 2): perplexity vs cumulative training FLOPs, mixture and dense.
* `plot_per_expert` (Figure 5): per routed test segment, dense (wide, light) and expert (narrow)
  perplexity; the label on each group is the segment's share of the test data.
* `plot_prefix_sweep` (Figure 4b): mixture test perplexity vs routing prefix length M-hat.
"""

from __future__ import annotations

from pathlib import Path

from ..io import atomic_open

MIXTURE_COLOR = "#1f5fa8"
DENSE_COLOR = "#d0672a"
SEED_COLOR = "#6b6b6b"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path = Path(path)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def plot_ppl_vs_flops(curves: dict, final: dict, path: Path, title: str = "") -> Path:
    """`curves` {"mixture": [(flops, ppl), ...], "dense": [...]} (validation, during training);
    `final` {"mixture": (flops, test_ppl), "dense": (...)} (the test-set points)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, color in (("mixture", MIXTURE_COLOR), ("dense", DENSE_COLOR), ("seed", SEED_COLOR)):
        points = curves.get(name) or []
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, ".-", color=color, alpha=0.8, label=f"{name} (validation, {len(xs)} evaluations)")
        if name in final:
            x, y = final[name]
            ax.plot([x], [y], "o" if name == "mixture" else "s", color=color, markersize=8,
                    label=f"{name} (test) {y:.2f}")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("perplexity")
    _plain_ticks(ax)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(title or "Perplexity vs training cost (cf. paper Fig. 2)", fontsize=10)
    return _save(fig, path)


def _plain_ticks(ax) -> None:
    """Plain numbers on both axes (no 7x10^1 style labels), scientific notation only as an axis offset."""
    from matplotlib.ticker import ScalarFormatter

    for axis in (ax.xaxis, ax.yaxis):
        fmt = ScalarFormatter(useMathText=True)
        fmt.set_scientific(axis is ax.xaxis)
        axis.set_major_formatter(fmt)


def plot_per_expert(per_expert: list[dict], path: Path, title: str = "") -> Path:
    """Figure 5: one group per routed test segment."""
    plt = _pyplot()
    rows = [r for r in per_expert if r.get("num_seqs")]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.7 * len(per_expert) + 2), 4))
    for r in rows:
        ax.bar(r["expert"], r["dense_ppl"], width=0.7, color=DENSE_COLOR, alpha=0.3,
               label="dense on the segment" if r is rows[0] else None)
        ax.bar(r["expert"], r["expert_ppl"], width=0.45, color=MIXTURE_COLOR, alpha=0.9,
               label="the segment's expert" if r is rows[0] else None)
        ax.text(r["expert"], r["dense_ppl"], f"{100 * r['share']:.0f}%", ha="center", va="bottom", fontsize=8)
    ax.set_xticks([r["expert"] for r in per_expert])
    ax.set_xlabel("routed test segment (expert); label: share of test data")
    ax.set_ylabel("test perplexity")
    ax.legend(fontsize=8)
    ax.set_title(title or "Experts specialise (cf. paper Fig. 5)", fontsize=10)
    return _save(fig, path)


def plot_prefix_sweep(sweep: list[dict], dense_ppl: float, path: Path, title: str = "") -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    xs = [s["prefix_len"] for s in sweep]
    ax.plot(xs, [s["ppl"] for s in sweep], "o-", color=MIXTURE_COLOR, label="mixture")
    ax.axhline(dense_ppl, color=DENSE_COLOR, linestyle="--", label="dense")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("routing prefix length M-hat (tokens)")
    ax.set_ylabel("test perplexity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "Routing prefix length at inference (cf. paper Fig. 4b)", fontsize=10)
    return _save(fig, path)
