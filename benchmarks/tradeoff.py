"""The paper's headline trade-off at CPU scale (§3.2, Figure 2): mixtures of small experts against dense models of
increasing size, on a training-FLOPs axis and on an inference-FLOPs axis.

The paper: 32 experts of 335M match a 1.3B dense model at ~3x less inference cost. Here: the `cpu` run's
42k-parameter experts (E = 2, 4, 8 from benchmarks/results/mixture_results.json, E = 4 over seeds from
mixture_seeds.json) against dense models of the `cpu` expert architecture made wider (`--widths`), each trained
with the E = 4 dense baseline's settings (same steps, same batch: the same tokens) on the same data, and scored
on the same test sequences. Each E's own dense baseline (same architecture as one expert, E x the batch) gives
the dense curve at the expert size.

    python benchmarks/tradeoff.py --run runs/cpu-e4-seed1 --widths 48,64      # hours on 2 CPU cores
    python benchmarks/tradeoff.py --run RUN --widths 24 --steps 4 --results /tmp/x   # smoke: the mechanics

Every dense model trains in ``<runs-dir>/tradeoff-dense-h<W>`` and resumes after an interruption. Writes
tradeoff.{json,md,png} to --results: test perplexity against training FLOPs and against inference FLOPs per
sequence; for each mixture the strongest dense model it matches with the cost ratios, and the training and
inference FLOPs a dense model of equal perplexity would need, read off the width curve (`dense_equivalent`).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
from pathlib import Path

import torch

from _results import write_results
from smalltalk.io import read_json
from smalltalk.model.config import ModelConfig
from smalltalk.model.flops import inference_flops, training_flops

RESULTS = Path(__file__).resolve().parent / "results"


def dense_point(run: Path, width: int, out: Path, steps: int, max_seqs: int) -> dict:
    """A dense model of the run's expert architecture at hidden size `width`, trained with the run's dense settings
    (or `steps` steps), evaluated on the run's test sequences."""
    from smalltalk.data.splits import load_split
    from smalltalk.run.layout import RunLayout, read_run_config
    from smalltalk.train.evaluate import evaluate_model_dir
    from smalltalk.train.trainer import Trainer, model_config_for_data

    cfg, layout = read_run_config(run), RunLayout(run)
    train = load_split(layout.data, "train")
    model = model_config_for_data(cfg.expert_model.replace(hidden_size=width, name=f"dense-h{width}"), train)
    settings = cfg.dense_train().replace(name=f"tradeoff-dense-h{width}", eval_every=0, eval_batches=0,
                                         **({"max_steps": steps, "warmup_steps": min(2, steps)} if steps else {}))
    Trainer(model, settings, train, out, progress=False).train()
    result = evaluate_model_dir(out / "model", layout.data, "test", max_seqs=max_seqs)
    S = train.dataset.seq_len
    return {"label": f"dense, hidden {width}", "kind": "dense", "width_curve": True, "hidden_size": width,
            "params": model.num_params(),
            "test_ppl": result.ppl, "test_seqs": result.num_seqs,
            "training_flops": training_flops(model, settings.max_steps, settings.batch_size, S - 1),
            "inference_flops": inference_flops(model, S)}


def mixture_points(results_file: Path, seeds_file: Path | None) -> list[dict]:
    """Each E's mixture and its own dense baseline (same architecture as one expert) from mixture_results.json."""
    points = []
    seeds = read_json(seeds_file) if seeds_file and seeds_file.is_file() else None
    for r in read_json(results_file)["runs"]:
        E, c = r["num_experts"], r["costs"]
        expert_params = ModelConfig.from_dict(r["config"]["expert_model"]).num_params()
        mix = {"label": f"mixture, E = {E}", "kind": "mixture", "num_experts": E, "params_per_expert": expert_params,
               "test_ppl": r["mixture_ppl"],
               "test_seqs": r["test_seqs"], "training_flops": c["mixture_training"],
               "inference_flops": c["mixture_inference"]}
        if seeds and E == 4:
            mix["seeds"] = {"mixture_ppl": seeds["mixture_ppl"], "dense_ppl": seeds["dense_ppl"],
                            "improvement_pct": seeds["improvement_pct"]}
        points.append(mix)
        points.append({"label": f"dense baseline of E = {E} (expert size, {E}x the expert batch)", "kind": "dense",
                       "baseline_of": E, "hidden_size": r["config"]["expert_model"]["hidden_size"], "params": expert_params,
                       "test_ppl": r["dense_ppl"],
                       "test_seqs": r["test_seqs"], "training_flops": c["dense_training"],
                       "inference_flops": c["dense_inference"]})
    return points


def shown(path: Path) -> str:
    """A path as the Markdown shows it: relative to the repository when inside it."""
    path = path.resolve()
    return str(path.relative_to(RESULTS.parent.parent)) if path.is_relative_to(RESULTS.parent.parent) else str(path)


def dense_equivalent(curve: list[dict], ppl: float) -> dict | None:
    """The training and inference FLOPs a dense model of perplexity `ppl` would need, read off the width curve
    (dense models trained on the same tokens, each wider than the last): log FLOPs interpolated linearly in log
    perplexity between the two neighbouring widths. None outside the curve: no extrapolation."""
    pts = sorted(curve, key=lambda p: p["inference_flops"])
    for a, b in zip(pts, pts[1:]):
        if min(a["test_ppl"], b["test_ppl"]) <= ppl <= max(a["test_ppl"], b["test_ppl"]) and \
                a["test_ppl"] != b["test_ppl"]:
            t = math.log(ppl / a["test_ppl"]) / math.log(b["test_ppl"] / a["test_ppl"])
            return {k: a[k] * (b[k] / a[k]) ** t for k in ("training_flops", "inference_flops")}
    return None


def matches(points: list[dict], curve: list[dict]) -> list[dict]:
    """For each mixture: the strongest dense model (lowest perplexity) it beats or equals, with the cost ratios, and
    the cost of a dense model of equal perplexity on the width curve (`dense_equivalent`)."""
    dense = sorted((p for p in points if p["kind"] == "dense"), key=lambda p: p["inference_flops"])
    out = []
    for m in (p for p in points if p["kind"] == "mixture"):
        beaten = [d for d in dense if m["test_ppl"] <= d["test_ppl"]]
        best = min(beaten, key=lambda d: d["test_ppl"]) if beaten else None
        eq = dense_equivalent(curve, m["test_ppl"])
        out.append({"mixture": m["label"], "mixture_ppl": m["test_ppl"],
                    "equal_ppl_dense_over_mixture_inference": eq["inference_flops"] / m["inference_flops"] if eq
                    else None,
                    "equal_ppl_dense_over_mixture_training": eq["training_flops"] / m["training_flops"] if eq else None,
                    "dense_matched": best["label"] if best else None,
                    "dense_ppl": best["test_ppl"] if best else None,
                    "dense_over_mixture_inference": best["inference_flops"] / m["inference_flops"] if best else None,
                    "dense_over_mixture_training": best["training_flops"] / m["training_flops"] if best else None})
    return out


def plot(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, title in ((axes[0], "training_flops", "training FLOPs"),
                           (axes[1], "inference_flops", "inference FLOPs per sequence")):
        for kind, marker, color in (("dense", "s", "tab:gray"), ("mixture", "o", "tab:blue")):
            pts = sorted((p for p in points if p["kind"] == kind), key=lambda p: p[key])
            ax.plot([p[key] for p in pts], [p["test_ppl"] for p in pts], marker=marker, linestyle="none",
                    color=color, label=kind)
            for p in pts:
                short = f"E={p['num_experts']}" if kind == "mixture" else f"h{p['hidden_size']}" + (
                    f", E={p['baseline_of']}'s tokens" if "baseline_of" in p else "")
                ax.annotate(short, (p[key], p["test_ppl"]), textcoords="offset points", xytext=(4, 3), fontsize=8)
        curve = sorted((p for p in points if p.get("width_curve")), key=lambda p: p[key])
        ax.plot([p[key] for p in curve], [p["test_ppl"] for p in curve], color="tab:gray", alpha=0.5,
                label="dense, widening (same tokens)")
        ax.set_xscale("log")
        ax.set_xlabel(title)
        ax.set_ylabel("test perplexity")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tables(report: dict, title: str) -> list[str]:
    """Every point, then each mixture's match on the dense side (the Markdown both trade-off reports share)."""
    lines = [f"# {title}", "",
             "| model | params | test ppl | training FLOPs | inference FLOPs / seq |", "|---|---|---|---|---|"]
    for p in sorted(report["points"], key=lambda p: (p["kind"], p["training_flops"])):
        params = f"{p['params']:,}" if "params" in p else f"{p['num_experts']} x {p['params_per_expert']:,}"
        lines.append(f"| {p['label']} | {params} | {p['test_ppl']:.2f} | {p['training_flops']:.3e} | "
                     f"{p['inference_flops']:.3e} |")
    lines += ["", "| mixture | ppl | strongest dense model it matches | its ppl | dense / mixture inference FLOPs | "
              "dense / mixture training FLOPs | dense of equal ppl / mixture: inference FLOPs | training FLOPs |",
              "|---|---|---|---|---|---|---|---|"]
    ratio = lambda v: f"{v:.2f}x" if v is not None else "off the curve"  # noqa: E731
    for m in report["matches"]:
        found = m["dense_matched"] is not None
        lines.append(f"| {m['mixture']} | {m['mixture_ppl']:.2f} | {m['dense_matched'] or 'none'} | "
                     + (f"{m['dense_ppl']:.2f} | {m['dense_over_mixture_inference']:.2f}x | "
                        f"{m['dense_over_mixture_training']:.2f}x | " if found else "| | | ")
                     + f"{ratio(m['equal_ppl_dense_over_mixture_inference'])} | "
                       f"{ratio(m['equal_ppl_dense_over_mixture_training'])} |")
    curve = ", ".join(p["label"] for p in report["points"] if p.get("width_curve"))
    return lines + ["", f"Dense of equal ppl: the FLOPs a dense model as good as the mixture would need, read off the "
                    f"width curve ({curve}; all trained on the same tokens) by interpolating log FLOPs linearly in "
                    "log perplexity between neighbouring widths; 'off the curve' where the mixture is outside its "
                    "range."]


def to_markdown(report: dict) -> str:
    lines = tables(report, "Mixtures vs dense models of increasing size (`cpu` scale, paper Figure 2)")
    lines += ["", f"Dense models of other widths: `{report['run']}`'s data, expert architecture and E = 4 dense "
              f"settings; test perplexity on {report['max_seqs']:,} evenly spaced test sequences (the "
              "mixture evaluation's). Mixture points: " + ", ".join(report["mixture_sources"]) + f". Machine: "
              f"{report['machine']}.", "", "![trade-off](tradeoff.png)"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="a finished run of the `cpu` preset (E = 4)")
    ap.add_argument("--widths", default="48,64", help="hidden sizes of the wider dense models")
    ap.add_argument("--mixture-results", type=Path, default=RESULTS / "mixture_results.json")
    ap.add_argument("--seeds", type=Path, default=RESULTS / "mixture_seeds.json")
    ap.add_argument("--runs-dir", type=Path, default=None, help="where the dense models train (default: --run's parent)")
    ap.add_argument("--steps", type=int, default=0, help="optimizer steps (0: the run's dense settings)")
    ap.add_argument("--max-seqs", type=int, default=0, help="test sequences (0: the run's eval.max_seqs)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from smalltalk.run.layout import read_run_config

    run_cfg = read_run_config(args.run)
    max_seqs = args.max_seqs or run_cfg.eval.max_seqs
    runs_dir = args.runs_dir or args.run.parent
    points = mixture_points(args.mixture_results, args.seeds)
    for width in (int(w) for w in args.widths.split(",") if w.strip()):
        points.append(dense_point(args.run, width, runs_dir / f"tradeoff-dense-h{width}", args.steps, max_seqs))
        print(f"dense h{width}: test ppl {points[-1]['test_ppl']:.2f}", file=sys.stderr)
    # The width curve: the run's own dense baseline and the wider models, all trained on the same tokens.
    curve = [p for p in points if p.get("width_curve") or p.get("baseline_of") == run_cfg.num_experts]
    for p in curve:
        p["width_curve"] = True
    report = {"benchmark": "tradeoff", "run": str(args.run), "max_seqs": max_seqs, "points": points,
              "matches": matches(points, curve), "mixture_sources": [shown(args.mixture_results), shown(args.seeds)],
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                         f"torch {torch.__version__}, {args.threads} threads"}
    plot(points, args.results / "tradeoff.png")
    write_results(args.results, "tradeoff", report, to_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
