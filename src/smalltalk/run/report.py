"""The run report: ``<run>/report.md`` with the tables and ``<run>/plots/*.png``, from ``<run>/results.json``.

`results.json` (written by the pipeline's report stage) holds everything the report shows, so the
report can be re-rendered, and benchmarks can read numbers without parsing Markdown::

    {"name", "num_experts", "prefix_len", "eval": {...mixture.evaluate.evaluate_mixture...},
     "costs": {...run.costs.RunCosts.to_dict()...}, "curves": {"mixture": [...], "dense": [...]},
     "timings_s": {stage: seconds}, "config": {...}, "environment": {...}}
"""

from __future__ import annotations

import re
from pathlib import Path

from ..io import atomic_write_text, read_json
from .costs import RunCosts, costs_markdown
from .layout import RunLayout
from .plots import plot_per_expert, plot_ppl_vs_flops, plot_prefix_sweep


def _f(x, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _pct(x) -> str:
    return "–" if x is None else f"{x:+.2f}%"


def make_plots(results: dict, plot_dir: Path) -> dict[str, Path]:
    """The report's PNGs; none (and the report says so) when matplotlib, the `[plot]` extra, is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return {}
    ev, costs = results["eval"], results["costs"]
    curves = results.get("curves", {})
    final = {"mixture": (costs["mixture_training"], ev["mixture"]["ppl"]),
             "dense": (costs["dense_training"], ev["dense"]["ppl"])}
    paths = {
        "ppl_vs_flops": plot_ppl_vs_flops({k: [(p["flops"], p["ppl"]) for p in v] for k, v in curves.items()},
                                          final, plot_dir / "ppl_vs_flops.png"),
        "per_expert": plot_per_expert(ev["per_expert"], plot_dir / "per_expert.png"),
    }
    if len(ev.get("prefix_sweep", [])) > 1:
        paths["prefix_sweep"] = plot_prefix_sweep(ev["prefix_sweep"], ev["dense"]["ppl"],
                                                  plot_dir / "prefix_sweep.png")
    return paths


def _test_set(ev: dict) -> str:
    """"512 test sequences", saying when they are an evenly spaced subset of the split and how to score all."""
    n, total = ev["num_seqs"], ev.get("split_num_seqs")
    if total is None or n >= total:
        return f"{n:,} test sequences" + (" (the whole split)" if total else "")
    return (f"{n:,} test sequences (an evenly spaced subset of the {total:,} of the test split; set eval.max_seqs: 0 "
            "in the run config, or run `smalltalk eval-mixture --run RUN`, to score them all)")


def training_setup(results: dict) -> str:
    """One sentence: how experts, seed and dense were trained, and which dense baseline this is."""
    from .config import RunConfig

    cfg = RunConfig.from_dict(results["config"])
    t, d, split = cfg.expert_train, cfg.dense_train(), cfg.split()
    protocol = (d.max_steps, d.batch_size, d.lr) == (t.max_steps, cfg.num_experts * t.batch_size, t.lr)
    which = ("the paper's protocol: the experts' steps at E times their batch, their learning rate" if protocol
             else "another (batch, steps, lr) at equal tokens, from the run config's `dense:` section")
    text = (f"Each expert trains {t.max_steps:,} steps x batch {t.batch_size} at lr {t.lr:g}; the dense baseline "
            f"{d.max_steps:,} steps x batch {d.batch_size} at lr {d.lr:g} ({which}), so experts and dense see the "
            "same number of tokens.")
    if split:
        text += (f" Split training (seed_fraction {split.fraction:g}): the experts branch from a dense seed, the dense "
                 f"run's first {split.seed_steps:,} steps, and each trains its steps {split.expert_start + 1:,}-"
                 f"{t.max_steps:,} on its shard; seed plus experts see the dense model's tokens.")
    return text


def render(results: dict, plots: dict[str, Path] | None = None, base: Path | None = None) -> str:
    """Markdown of the report; `plots` paths are written relative to `base`."""
    ev = results["eval"]
    costs = RunCosts(**{k: results["costs"][k] for k in RunCosts.__dataclass_fields__})
    E, M = results["num_experts"], results["prefix_len"]
    has_bpb = "bpb" in ev["mixture"]
    out = [f"# SmallTalk LM run: {results.get('name', '')}", ""]
    verdict = "below" if ev["mixture"]["ppl"] < ev["dense"]["ppl"] else "NOT below"
    out += [f"Mixture of **{E} experts** routed on a **{M}-token prefix**: test perplexity "
            f"**{ev['mixture']['ppl']:.2f}** vs dense **{ev['dense']['ppl']:.2f}** "
            f"({ev['improvement_pct']:+.2f}% improvement: {verdict} dense) on {_test_set(ev)} "
            f"({ev['num_tokens']:,} predicted tokens), at equal training tokens; training FLOPs "
            f"{costs.training_overhead_pct:+.2f}% and inference FLOPs {costs.inference_overhead_pct:+.2f}% vs dense.",
            ""]
    out += ["## Test perplexity", "",
            "| Model | Test ppl | " + ("bits/byte | " if has_bpb else "") + "vs dense |",
            "|---|---|" + ("---|" if has_bpb else "") + "---|"]

    def row(name, m, pct):
        bpb = f" {_f(m.get('bpb'), 4)} |" if has_bpb else ""
        return f"| {name} | {m['ppl']:.2f} |{bpb} {pct} |"

    out.append(row("dense", ev["dense"], "–"))
    out.append(row(f"mixture, {E} experts (M-hat = {M})", ev["mixture"], _pct(ev["improvement_pct"])))
    if "soft_topk" in ev:
        s = ev["soft_topk"]
        out.append(row(f"top-{s['k']} soft mixing (beyond the paper)", s, _pct(s["improvement_pct"])))
    out.append(row("oracle routing (best expert per sequence, upper bound)", ev["oracle"],
                   _pct(ev["oracle"]["improvement_pct"])))
    out += ["", "Improvement = (dense ppl - ppl) / dense ppl; positive means lower perplexity than dense.", ""]

    out += ["## Experts specialise (per routed test segment, cf. Figure 5)", "",
            "| Expert | Test share | Train share | Expert ppl | Dense ppl | Improvement |", "|---|---|---|---|---|---|"]
    for r in ev["per_expert"]:
        train_share = "–" if r.get("train_share") is None else f"{100 * r['train_share']:.1f}%"
        out.append(f"| {r['expert']} | {100 * r['share']:.1f}% | {train_share} | {_f(r['expert_ppl'])} | "
                   f"{_f(r['dense_ppl'])} | {_pct(r['improvement_pct'])} |")
    out += ["", f"Every expert beats dense on its own segment: **{ev['all_experts_beat_dense_on_their_segment']}**.", ""]
    cross = ev.get("cross_ppl")
    if cross:
        out += ["Perplexity of each expert (rows) on each routed segment (columns); the routed expert is in bold:",
                "", "| expert \\ segment | " + " | ".join(str(k) for k in range(E)) + " |",
                "|---|" + "---|" * E]
        for e, line in enumerate(cross):
            cells = [("**" + _f(v) + "**") if k == e and v is not None else _f(v) for k, v in enumerate(line)]
            out.append(f"| {e} | " + " | ".join(cells) + " |")
        out.append("")

    out += ["## Cost (cf. Table 3)", "", costs_markdown(costs), "",
            "Training FLOPs count the steps actually run (Eq. 10, 13, 15) and the sequences actually scored by the "
            f"routers (Eq. 14, 16). {training_setup(results)} Inference is per sequence of the context length "
            "(Eq. 11), the mixture adding E routers on the routing prefix.", ""]

    sweep = ev.get("prefix_sweep", [])
    if len(sweep) > 1:
        out += ["## Routing prefix length at inference (cf. Figure 4b)", "",
                "| M-hat | Mixture ppl | vs dense | Same expert as M-hat = M | Inference FLOPs vs dense |",
                "|---|---|---|---|---|"]
        for s in sweep:
            flops = "–" if s.get("inference_overhead_pct") is None else f"+{s['inference_overhead_pct']:.2f}%"
            out.append(f"| {s['prefix_len']} | {s['ppl']:.2f} | {_pct(s['improvement_pct'])} | "
                       f"{100 * s['agreement']:.1f}% | {flops} |")
        out.append("")

    domains = ev.get("domains")
    if domains:
        out += ["## Where each domain is routed (test sequences; domain labels are never used for routing)", "",
                "| Domain | " + " | ".join(f"expert {e}" for e in range(E)) + " |", "|---|" + "---|" * E]
        for name, counts in zip(domains["names"], domains["counts"]):
            if sum(counts):
                out.append(f"| {name} | " + " | ".join(str(c) for c in counts) + " |")
        out.append("")

    if plots is not None and not plots:
        out += ["## Plots", "", "Not drawn: matplotlib is not installed (`pip install smalltalk[plot]`).", ""]
    if plots:
        out += ["## Plots", ""]
        for key, path in plots.items():
            rel = Path(path).relative_to(base) if base else Path(path)
            out.append(f"![{key}]({rel.as_posix()})")
        out.append("")

    timings = results.get("timings_s") or {}
    if timings:
        out += ["## Stages", "", "| Stage | Seconds |", "|---|---|"]
        out += [f"| {k} | {v:.1f} |" for k, v in timings.items()]
        env = results.get("environment") or {}
        if env:
            out += ["", "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items())]
        out.append("")
    return "\n".join(out)


_SECTION = re.compile(r"<!-- ([\w-]+) -->\n.*?<!-- /\1 -->\n?", re.S)


def write_report(run_dir: Path, results: dict) -> Path:
    """Write ``<run_dir>/plots/*.png`` and ``<run_dir>/report.md``; returns the report path.

    Sections other tools added between ``<!-- name -->`` / ``<!-- /name -->`` markers (e.g. the
    downstream evaluation) are kept when the report is re-rendered."""
    run_dir = Path(run_dir)
    plots = make_plots(results, run_dir / "plots")
    path = run_dir / "report.md"
    text = render(results, plots, base=run_dir)
    analyses = RunLayout(run_dir).analysis_sections()  # `smalltalk analyze` sections, in name order
    if analyses:
        text = text.rstrip("\n") + "\n\n" + analyses
    if path.is_file():
        for m in _SECTION.finditer(path.read_text(encoding="utf-8")):
            text = text.rstrip("\n") + "\n\n" + m.group(0).rstrip("\n") + "\n"
    atomic_write_text(path, text)
    return path


def refresh_report(run_dir: Path) -> Path | None:
    """Re-render ``<run_dir>/report.md`` from its ``results.json`` (after an analysis added a section);
    None when the run has no results yet (its report stage will include the sections)."""
    results = Path(run_dir) / "results.json"
    if not results.is_file():
        return None
    return write_report(Path(run_dir), read_json(results))
