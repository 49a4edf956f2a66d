"""Fold every map result into one table, fit the planner's law, and draw improvement vs tokens per parameter.

    python benchmarks/map_fit.py                          # benchmarks/results/map_*.json -> map.{json,md}, map.png
    python benchmarks/map_fit.py --holdout map_42k_e4:3   # fit without budget 3 of that map and record the prediction
                                                          # (before the point is run; compared once it exists)
    python benchmarks/map_fit.py --predict map_42k_e8:8:2,4,8,16,30,60,100,200
                                                          # a whole map the law has not seen (here E = 8), predicted
                                                          # from the shipped law before it runs: prediction_STEM.json

Writes benchmarks/results/map.{json,md}, map.png and the shipped law src/smalltalk/plan/default_law.json (the law
is fitted on every point except the held-out one, so its prediction stays honest).
"""

from __future__ import annotations

import argparse
import math
import subprocess
import time
from pathlib import Path

from _results import run_main, write_results
from smalltalk.errors import SmallTalkError
from smalltalk.io import atomic_write_json, read_json
from smalltalk.plan.law import Law, bootstrap_crossover, fit
from smalltalk.plan.planner import DEFAULT_LAW
from smalltalk.plan.points import points_of_map

RESULTS = Path(__file__).resolve().parent / "results"
EXCLUDED = {"map", "map_holdout"}


def map_reports(results: Path) -> dict[str, dict]:
    return {p.stem: read_json(p) for p in sorted(results.glob("map_*.json")) if p.stem not in EXCLUDED}


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=RESULTS).stdout.strip()
    except OSError:
        return ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--holdout", help="STEM:BUDGET_INDEX of a point to predict before it is measured (e.g. "
                                      "map_42k_e4:3), or STEM:BUDGET_INDEX:TOKENS_PER_PARAM when that map has not "
                                      "reached it yet")
    ap.add_argument("--predict", help="STEM:E:TPP,TPP,... a map not run yet (e.g. an E the law was not fitted on): "
                                      "predict it from the shipped law, write prediction_STEM.json and stop")
    ap.add_argument("--note", default="", help="with --predict: anything the reader should know (kept in the file)")
    ap.add_argument("--params", type=int, default=0, help="with --predict: the expert's parameter count, for a size "
                                                          "no measured map has yet")
    ap.add_argument("--results", type=Path, default=RESULTS, help="where the map_*.json are and map.* go")
    ap.add_argument("--law-out", type=Path, default=DEFAULT_LAW, help="the fitted law (default: the shipped one)")
    args = ap.parse_args(argv)
    holdout_path = args.results / "map_holdout.json"
    reports = map_reports(args.results)
    if args.predict:
        path = args.results / f"prediction_{args.predict.split(':')[0]}.json"
        atomic_write_json(path, {**predict_map(args.predict, reports, args.law_out, args.params), "note": args.note})
        print(f"wrote {path}")
        return 0
    if not reports:
        raise SmallTalkError(f"{args.results}: no map_*.json yet; run benchmarks/map.py first")
    holdout = read_json(holdout_path) if holdout_path.is_file() else None
    if args.holdout:
        holdout = predict_holdout(args.holdout, reports)
        atomic_write_json(holdout_path, holdout)  # the prediction is on disk before the point is measured
    held = (holdout["stem"], holdout["budget"]) if holdout else None
    points, rows = [], []
    for stem, report in reports.items():
        for b in report["budgets"]:
            row_points = points_of_map({**report, "budgets": [b]}, f"{stem}:{b['budget']}")
            rows.append({"stem": stem, "size": report["size"], "params": report["params"],
                         "num_experts": report["num_experts"], **b})
            if held != (stem, b["budget"]):
                points += row_points
    law = fit(points)
    atomic_write_json(args.law_out, {"law": law.to_dict(), "fitted": time.strftime("%Y-%m-%d"), "commit": commit(),
                                    "form": "smalltalk.plan.law (module docstring)",
                                    "held_out": f"{held[0]}:{held[1]}" if held else None})
    crossovers = {}
    for report in reports.values():
        key = f"{report['size']}_e{report['num_experts']}"
        crossovers[key] = {"law": law.crossover(report["params"], report["num_experts"]),
                           **bootstrap_crossover(points, report["params"], report["num_experts"])}
    if holdout:
        holdout = compare_holdout(holdout, reports)
        atomic_write_json(holdout_path, holdout)
    predictions = [compare_prediction(read_json(p), reports) for p in sorted(args.results.glob("prediction_*.json"))]
    summary = {"law": law.to_dict(), "rows": rows, "crossover_tokens_per_param": crossovers, "holdout": holdout,
               "predictions": predictions}
    plot(summary, law, args.results / "map.png")
    write_results(args.results, "map", summary, render(summary))
    return 0


def predict_holdout(spec: str, reports: dict) -> dict:
    """Fit without the held-out point and write its prediction now, before it is measured."""
    stem, budget, *tpp = spec.split(":")
    budget = int(budget)
    if stem not in reports:
        raise SmallTalkError(f"--holdout {spec}: no {stem}.json among the map results")
    report = reports[stem]
    measured = [b for b in report["budgets"] if b["budget"] == budget]
    if measured and not tpp:
        tokens = measured[0]["tokens"]
    elif tpp:
        tokens = int(float(tpp[0]) * report["num_experts"] * report["params"])
    else:
        raise SmallTalkError(f"--holdout {spec}: budget {budget} is not measured yet; give its tokens per parameter "
                             f"as {stem}:{budget}:TPP")
    points = [p for s, r in reports.items() for b in r["budgets"] if (s, b["budget"]) != (stem, budget)
              for p in points_of_map({**r, "budgets": [b]}, f"{s}:{b['budget']}")]
    law = fit(points)
    N, E = report["params"], report["num_experts"]
    return {"stem": stem, "budget": budget, "tokens": tokens, "predicted_at": time.strftime("%Y-%m-%d %H:%M"),
            "commit": commit(), "measured_when_predicted": bool(measured),
            "predicted": predicted_ppl(law, N, tokens, E),
            "fitted_on": len(points)}


def predict_map(spec: str, reports: dict, law_path: Path, params: int = 0) -> dict:
    """Predict every budget of a map from the law as shipped now; the law's constants travel with the prediction so
    the comparison later uses exactly what was committed, whatever the law becomes once the map is fitted."""
    try:
        stem, experts, budgets = spec.split(":")
        E, tpps = int(experts), [float(x) for x in budgets.split(",")]
    except ValueError:
        raise SmallTalkError(f"--predict {spec!r}: expected STEM:E:TPP,TPP,... (e.g. map_42k_e8:8:2,8,30)") from None
    size = stem.split("_")[1] if stem.count("_") >= 2 else ""
    same_size = [r["params"] for r in reports.values() if r["size"] == size] or ([params] if params > 0 else [])
    if not same_size:
        raise SmallTalkError(f"--predict {spec}: no measured map of size {size!r} gives the expert's parameter count; "
                             "give it as --params N")
    if params > 0 and params != same_size[0]:
        raise SmallTalkError(f"--params {params}: the measured map of size {size!r} has {same_size[0]:,} parameters")
    if stem in reports:
        raise SmallTalkError(f"--predict {spec}: {stem}.json is already measured; a prediction must come first")
    shipped = read_json(law_path)
    law = Law.from_dict(shipped["law"])
    N = same_size[0]
    return {"stem": stem, "num_experts": E, "params": N, "predicted_at": time.strftime("%Y-%m-%d %H:%M"),
            "commit": commit(), "law": shipped["law"], "law_commit": shipped.get("commit"),
            "gain_measured_for_E": law.gain_of(E)[1],
            "extrapolation": sorted({why for t in tpps for why in law.outside(N, t * E * N, E)}),
            "predicted": [{"tokens_per_param": t, **predicted_ppl(law, N, t * E * N, E)} for t in tpps]}


def predicted_ppl(law: Law, N: float, tokens: float, E: int) -> dict:
    dense, mixture = math.exp(law.dense(N, tokens)), math.exp(law.mixture(N, tokens, E))
    return {"dense_ppl": dense, "mixture_ppl": mixture, "improvement_pct": 100 * (1 - mixture / dense)}


def compare_prediction(pred: dict, reports: dict) -> dict:
    """The prediction's own law at each measured budget's exact tokens, beside what was measured."""
    law, N, E = Law.from_dict(pred["law"]), pred["params"], pred["num_experts"]
    rows = []
    for b in reports.get(pred["stem"], {}).get("budgets", []):
        p = predicted_ppl(law, N, b["tokens"], E)
        rows.append({"tokens_per_param": b["tokens_per_param"], "predicted": p,
                     "measured": {k: b[k] for k in ("dense_ppl", "mixture_ppl", "improvement_pct")},
                     "error_pct": {k: 100 * (p[k] / b[k] - 1) for k in ("dense_ppl", "mixture_ppl")}})
    keep = ("stem", "num_experts", "predicted_at", "commit", "law_commit", "note")
    return {k: pred.get(k) for k in keep} | {"rows": rows}


def compare_holdout(holdout: dict, reports: dict) -> dict:
    rows = [b for b in reports.get(holdout["stem"], {}).get("budgets", []) if b["budget"] == holdout["budget"]]
    if not rows:
        return {**holdout, "measured": None}
    b = rows[0]
    measured = {"dense_ppl": b["dense_ppl"], "mixture_ppl": b["mixture_ppl"]}
    error = {k: 100 * (holdout["predicted"][k] / measured[k] - 1) for k in measured}
    return {**holdout, "measured": measured, "error_pct": error}


def plot(summary: dict, law, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 4))
    groups = sorted({(r["size"], r["params"], r["num_experts"]) for r in summary["rows"]})
    # Every law curve spans the whole measured range, so where each size's crossover falls is visible side by side.
    span = [r["tokens_per_param"] for r in summary["rows"]]
    xs = np.exp(np.linspace(np.log(min(span) / 2), np.log(max(span) * 2), 100))
    for i, (size, N, E) in enumerate(groups):
        rows = sorted((r for r in summary["rows"] if (r["size"], r["num_experts"]) == (size, E)),
                      key=lambda r: r["tokens_per_param"])
        color = f"C{i}"
        ax.plot([r["tokens_per_param"] for r in rows], [r["improvement_pct"] for r in rows], "o", color=color,
                label=f"{size} experts, E={E} (measured)")
        for r in rows:
            for s in r.get("split", []):
                ax.plot([r["tokens_per_param"]], [s["improvement_pct"]], "^", color=color, alpha=0.7)
        ys = [predicted_ppl(law, N, x * E * N, E)["improvement_pct"] for x in xs]
        ax.plot(xs, ys, "-", color=color, alpha=0.6, label=f"{size}, E={E} (law)")
    # The law runs far below the measured points at the smallest budgets; frame the measurements (the crossover).
    measured = [r["improvement_pct"] for r in summary["rows"]] + \
        [s["improvement_pct"] for r in summary["rows"] for s in r.get("split", [])]
    ax.set_ylim(min(measured) - 15, max(measured) + 10)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("training tokens per expert parameter")
    ax.set_ylabel("mixture vs tuned dense, test ppl (%)")
    ax.set_title("Where the mixture wins (triangles: split training)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def render(summary: dict) -> str:
    law = summary["law"]
    lines = ["# The map: pure (and split) mixture vs the tuned dense model at equal training FLOPs", "",
             "Each row: both sides tuned on a coarse (batch, lr) grid at that budget (benchmarks/map.py), test "
             "perplexity of the best of each. Improvement > 0: the mixture is better.", "",
             "| map | experts (params) | E | tokens / expert param | dense ppl | mixture ppl | mixture vs dense | "
             "split (f: vs dense) | every expert beats dense on its segment |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(summary["rows"], key=lambda r: (r["params"], r["num_experts"], r["tokens_per_param"])):
        split = "; ".join(f"{s['fraction']:g}: {s['improvement_pct']:+.1f}%" for s in r.get("split", [])) or "–"
        lines.append(f"| {r['stem']} | {r['size']} ({r['params']:,}) | {r['num_experts']} | {r['tokens_per_param']:.1f} | "
                     f"{r['dense_ppl']:.2f} | {r['mixture_ppl']:.2f} | {r['improvement_pct']:+.2f}% | {split} | "
                     f"{r['every_expert_beats_dense']} |")
    lines += ["", "## The fitted law (smalltalk.plan.law)", "",
              f"dense loss = {law['e']:.4f} + {law['a']:.4g} N^-{law['alpha']:.3f} + {law['b']:.4g} "
              f"N^{law.get('gamma', 0):.3f} D^-{law['beta']:.3f}"
              + (f" ({', '.join(law['assumed'])} assumed, not fitted: two sizes cannot identify it)"
                 if law.get("assumed") else "") + "; "
              "mixture: the data term at D / E and a specialisation gain s_E ln E with "
              + ", ".join(f"s_{E} = {s:.4f}" for E, s in law["gain"].items())
              + ("; split gain share " + ", ".join(f"phi_{f} = {v:.3f}" for f, v in law["split"].items())
                 if law["split"] else "")
              + f". RMSE: dense {law['rmse'].get('dense', 0):.4f}, mixture {law['rmse'].get('mixture', 0):.4f} nats, "
              f"on {len(law['fitted_on'])} budget rows.", "",
              "| experts | crossover (law) | bootstrap median | 10th-90th percentile | resamples where it never wins |",
              "|---|---|---|---|---|"]
    fmt = lambda x: "never" if x is None else f"{x:.1f}"  # noqa: E731
    for key, c in summary["crossover_tokens_per_param"].items():
        lines.append(f"| {key} | {fmt(c['law'])} | {fmt(c['median'])} | {fmt(c['p10'])} - {fmt(c['p90'])} | "
                     f"{c['never']} of {c['rounds']} |")
    h = summary.get("holdout")
    if h:
        lines += ["", f"## Held-out prediction ({h['stem']} budget {h['budget']}, predicted {h['predicted_at']} at "
                  f"{h['commit']}, {'after' if h['measured_when_predicted'] else 'before'} it was measured)", "",
                  "| | predicted | measured | error |", "|---|---|---|---|"]
        for k in ("dense_ppl", "mixture_ppl"):
            m = h.get("measured") or {}
            lines.append(f"| {k} | {h['predicted'][k]:.2f} | {m.get(k, float('nan')):.2f} | "
                         f"{(h.get('error_pct') or {}).get(k, float('nan')):+.1f}% |")
    for pred in summary.get("predictions", []):
        lines += ["", f"## Predicted before it ran: {pred['stem']} (E = {pred['num_experts']}), from the law of "
                  f"{pred['law_commit']}, predicted {pred['predicted_at']}", ""] + ([pred["note"], ""] if pred["note"] else [])
        if not pred["rows"]:
            lines.append("Not measured yet.")
            continue
        lines += ["| tokens / expert param | dense: predicted / measured | mixture: predicted / measured | "
                  "mixture vs dense: predicted / measured |", "|---|---|---|---|"]
        for r in pred["rows"]:
            p, m = r["predicted"], r["measured"]
            lines.append(f"| {r['tokens_per_param']:.1f} | {p['dense_ppl']:.2f} / {m['dense_ppl']:.2f} | "
                         f"{p['mixture_ppl']:.2f} / {m['mixture_ppl']:.2f} | {p['improvement_pct']:+.1f}% / "
                         f"{m['improvement_pct']:+.1f}% |")
    lines += ["", "![improvement vs tokens per parameter](map.png)"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run_main(main)
