"""Prefix-length analysis (paper §3.4 Figure 4b, App. C Figure 6).

Mixture test perplexity when each test sequence is routed on only its first M-hat tokens, for
M-hat in {8, 16, 32, ...} up to the routers' context (which may exceed the M the routers were
trained on: App. C's extrapolation), against the dense baseline. With other runs given (e.g. the
same experiment partitioned with M = 32), their curves go on the same plot: a partition trained
with a short prefix should route better from short prompts (App. C).

Routing is exactly the evaluation's (mixture/evaluate.py): argmax over routers of the summed
log-probs of prefix tokens 2..M-hat, no balancing; the chosen expert scores the whole sequence.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import SmallTalkError
from ..mixture.scores import improvement_pct
from ..routing import rule
from .output import markdown_table, pct, pyplot, save_figure, write_analysis
from .runs import PrefixSettings, RunView, open_run
from .scores import check_lm_prefix_len, router_logp

NAME = "prefix-length"


def default_prefix_lens(train_prefix_len: int, context: int) -> list[int]:
    """8, 16, 32, ... up to `context`, plus the training prefix M."""
    lens, m = [], 8
    while m <= context:
        lens.append(m)
        m *= 2
    return sorted(set(lens + [train_prefix_len] if train_prefix_len <= context else lens))


def router_context(view: RunView) -> int:
    from ..model.io import read_model_config

    if view.routers_dir is None:
        raise SmallTalkError(f"{view.root}: the run has no routers/ (trained routers are needed to route)")
    cfg, _ = read_model_config(view.routers_dir / "router_0")
    return min(cfg.max_seq_len, view.seq_len)


def sweep_run(view: RunView, cfg: PrefixSettings, log: Callable[[str], None] | None = None) -> dict:
    """One run's curve: {"label", "prefix_len", "dense_ppl", "rows": [{prefix_len, ppl, ...}]}."""
    context = router_context(view)
    lens = cfg.prefix_lens or default_prefix_lens(view.prefix_len, context)
    lens = sorted({check_lm_prefix_len(m, context, f"the routers' context in {view.root}") for m in lens})
    scores = view.scores(cfg, log=log)
    logp = router_logp(view.routers_dir, view.data_dir, scores.indices, max(lens + [view.prefix_len]),
                       split=cfg.split, device=cfg.device)  # (N, E, P-1)
    reference = rule.route_logp(logp, min(view.prefix_len, logp.shape[2] + 1))  # routing at M-hat = M
    dense = scores.dense_ppl()
    rows = []
    for m in lens:
        routes = rule.route_logp(logp, m)
        ppl = scores.ppl(routes)
        rows.append({"prefix_len": m, "ppl": ppl,
                     "improvement_pct": None if dense is None else improvement_pct(dense, ppl),
                     "agreement_with_M": float((routes == reference).mean()),
                     "shares": (np.bincount(routes, minlength=view.num_experts) / len(routes)).tolist()})
    return {"label": view.label, "run_dir": str(view.root), "prefix_len": view.prefix_len, "context": context,
            "dense_ppl": dense, "num_seqs": scores.num_seqs, "rows": rows}


def analyze_prefix_length(run_dir: str | Path, cfg: PrefixSettings | None = None,
                          compare: Sequence[tuple[str | None, str | Path]] = (),
                          log: Callable[[str], None] | None = None) -> dict:
    """The curve of `run_dir` and of each (label, run_dir) in `compare`; writes ``<run>/analysis/prefix-length/``."""
    cfg = cfg or PrefixSettings()
    main = open_run(run_dir)
    curves = [sweep_run(main, cfg, log)]
    for label, other in compare:
        view = open_run(other)
        curve = sweep_run(view, cfg, log)
        curve["label"] = label or f"{view.label} (M={view.prefix_len})"
        curves.append(curve)
    curves[0]["label"] = f"{main.label} (M={main.prefix_len})"
    result = {"split": cfg.split, "curves": curves}
    _write(main.root, result)
    return result


def _summary(result: dict) -> str:
    lines = []
    for c in result["curves"]:
        dense = c["dense_ppl"]
        beats = [r["prefix_len"] for r in c["rows"] if dense is not None and r["ppl"] < dense]
        at32 = next((r for r in c["rows"] if r["prefix_len"] == 32), None)
        s = f"**{c['label']}**: "
        s += (f"beats dense ({dense:.2f}) from M-hat = {min(beats)}" if beats
              else f"does not beat dense ({dense:.2f}) at any M-hat tried")
        if at32:
            s += f"; at M-hat = 32 ppl {at32['ppl']:.2f} ({pct(at32['improvement_pct'])} vs dense)"
        lines.append(s + ".")
    return ("Mixture test perplexity when routing on the first M-hat tokens only (cf. paper Figure 4b, "
            "App. C Figure 6). " + " ".join(lines))


def _write(run_root: Path, result: dict) -> None:
    rows = [[c["label"], c["prefix_len"], r["prefix_len"], r["ppl"], c["dense_ppl"], pct(r["improvement_pct"]),
             f"{100 * r['agreement_with_M']:.1f}%"] for c in result["curves"] for r in c["rows"]]
    table = markdown_table(["run", "M (train)", "M-hat", "mixture ppl", "dense ppl", "vs dense",
                            "same expert as M-hat = M"], rows)
    write_analysis(run_root, NAME, "Routing prefix length (cf. Figure 4b, Figure 6)", result, table,
                   _summary(result), plot=lambda path: plot_prefix_length(result, path))


def plot_prefix_length(result: dict, path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    dense_drawn = set()
    for i, c in enumerate(result["curves"]):
        color = colors[i % len(colors)]
        xs = [r["prefix_len"] for r in c["rows"]]
        ax.plot(xs, [r["ppl"] for r in c["rows"]], "o-", color=color, label=f"mixture, {c['label']}")
        ax.axvline(c["prefix_len"], color=color, linestyle=":", alpha=0.6)
        if c["dense_ppl"] is not None and round(c["dense_ppl"], 3) not in dense_drawn:
            dense_drawn.add(round(c["dense_ppl"], 3))
            ax.axhline(c["dense_ppl"], color="black" if i == 0 else color, linestyle="--", alpha=0.7,
                       label=f"dense ({c['dense_ppl']:.2f})" + ("" if i == 0 else f", {c['label']}"))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("routing prefix length M-hat (tokens); dotted: M used to train the partition")
    ax.set_ylabel("test perplexity")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title("Mixture perplexity vs routing prefix length", fontsize=10)
    return save_figure(fig, path)
