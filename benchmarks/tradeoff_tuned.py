"""The trade-off (paper Figure 2) against tuned dense models: tuned mixtures beside a width curve of dense models
each tuned at the same tokens, on a training-FLOPs axis and an inference-FLOPs axis.

The tuned counterpart of `tradeoff.py` (whose every model is trained as the paper's protocol). Inputs are results
already measured:

* the width curve: `tuned_widths.py`'s report (dense models 32, 48, 64 wide, each tuned on its own grid, all on the
  E = 4 map point's tokens and test sequences);
* the mixtures: one-budget or multi-budget map reports (`map.py`), one per E; from a multi-budget report the budget
  nearest the width curve's tokens per expert parameter. Each report's own tuned dense (expert size, its E's
  tokens) is a dense point too.

Mixture training FLOPs are the experts' (their best line's steps x batch) plus the routers' EM, training and
sharding, taken from the `smalltalk run` results of the same preset and E (`--protocol-results`: the routers do
not depend on how the experts are tuned); inference FLOPs are one expert plus E routers on the prefix.

    python benchmarks/tradeoff_tuned.py --widths-report benchmarks/results/tuned_widths_tuned_cpu_seed0.json \\
        --mixtures benchmarks/results/tuned_cpu_e2.json benchmarks/results/tuned_cpu_seed0.json \\
        benchmarks/results/map_42k_e8.json

Writes tradeoff_tuned.{json,md,png} to --results.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _results import run_main, write_results
from smalltalk.errors import SmallTalkError
from smalltalk.io import read_json
from smalltalk.model.config import ModelConfig
from smalltalk.model.flops import inference_flops, training_flops
from tradeoff import matches, plot, shown, tables

RESULTS = Path(__file__).resolve().parent / "results"


def router_terms(protocol: dict, num_experts: int, path: Path) -> dict:
    """The routers' share of a run of `num_experts` experts: training overhead and inference per sequence."""
    for r in protocol["runs"]:
        if r["num_experts"] == num_experts:
            c = r["costs"]
            return {"training": c["mixture_training"] - c["experts_training"], "inference": c["routers_inference"]}
    raise SmallTalkError(f"{path}: no run with {num_experts} experts; it gives the routers' FLOPs of each E")


def width_points(widths: dict) -> list[dict]:
    points = []
    for r in widths["widths"]:
        own = r["hidden_size"] == widths["widths"][0]["hidden_size"]
        points.append({"label": f"tuned dense, hidden {r['hidden_size']}" + (" (expert size)" if own else ""),
                       "kind": "dense", "width_curve": True, "hidden_size": r["hidden_size"], "params": r["params"],
                       "tokens": widths["tokens"], "best_line": r["best"], "test_ppl": r["test_ppl"],
                       "training_flops": r["training_flops"], "inference_flops": r["inference_flops"]})
    return points


def mixture_point(path: Path, widths: dict, protocol: dict, protocol_path: Path) -> list[dict]:
    """The mixture of one map report (and its own tuned dense unless it is the width curve's), with FLOPs."""
    report = read_json(path)
    target = widths["tokens_per_expert_param"]
    b = min(report["budgets"], key=lambda b: abs(b["tokens_per_param"] - target))
    expert = ModelConfig.from_dict(widths["widths"][0]["model"])
    S = widths["widths"][0]["seq_len"]
    if expert.num_params() != report["params"]:
        raise SmallTalkError(f"{path}: {report['params']:,}-parameter experts, but the width curve's expert size has "
                             f"{expert.num_params():,}; compare reports of one architecture")
    E = report["num_experts"]
    routers = router_terms(protocol, E, protocol_path)
    mix, dense = b["best_valid"]["mixture"], b["best_valid"]["dense"]
    points = [{"label": f"tuned mixture, E = {E}", "kind": "mixture", "num_experts": E,
               "params_per_expert": report["params"], "tokens": b["tokens"], "source": str(path),
               "tokens_per_param": b["tokens_per_param"], "best_line": b["lines"]["mixture"],
               "test_ppl": b["mixture_ppl"],
               "training_flops": E * training_flops(expert, mix["steps"], mix["batch_size"], S - 1) + routers["training"],
               "inference_flops": inference_flops(expert, S) + routers["inference"]}]
    if Path(path).resolve() != Path(widths["map_report"]).resolve():
        points.append({"label": f"tuned dense of E = {E} (expert size, its tokens)", "kind": "dense",
                       "baseline_of": E, "hidden_size": expert.hidden_size, "params": report["params"],
                       "tokens": b["tokens"], "best_line": b["lines"]["dense"], "test_ppl": b["dense_ppl"],
                       "training_flops": training_flops(expert, dense["steps"], dense["batch_size"], S - 1),
                       "inference_flops": inference_flops(expert, S)})
    return points


def to_markdown(report: dict) -> str:
    w = report["widths"]
    lines = tables(report, "Mixtures vs tuned dense models of increasing size (`cpu` scale, paper Figure 2)")
    lines += ["", f"Width curve: `{shown(Path(report['widths_report']))}` (seed {w['seed']}, {w['tokens']:,} training "
              f"tokens each, batch {w['batches']} x peak lr {w['lrs']} per width, WSD; test ppl on "
              f"{w['test_seqs']:,} test sequences). Mixtures (each with its own tuned dense at expert size): "
              + ", ".join(f"`{shown(Path(p))}`" for p in report["mixture_sources"])
              + f"; the routers' FLOPs from `{shown(Path(report['protocol_results']))}` (same preset and E). "
              "Best lines: " + "; ".join(f"{p['label']} {p['best_line']}" for p in report["points"])
              + ".", "", "![trade-off, tuned](tradeoff_tuned.png)"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths-report", type=Path, required=True, help="tuned_widths.py's JSON (the width curve)")
    ap.add_argument("--mixtures", type=Path, nargs="+", required=True, help="map reports, one per E")
    ap.add_argument("--protocol-results", type=Path, default=RESULTS / "mixture_results.json",
                    help="`smalltalk run` results per E (the routers' FLOPs)")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    widths, protocol = read_json(args.widths_report), read_json(args.protocol_results)
    points = width_points(widths)
    for path in args.mixtures:
        points += mixture_point(path, widths, protocol, args.protocol_results)
    Es = [p["num_experts"] for p in points if p["kind"] == "mixture"]
    if len(set(Es)) != len(Es):
        raise SmallTalkError(f"--mixtures: two reports with the same number of experts ({sorted(Es)}); give one per E")
    curve = [p for p in points if p.get("width_curve")]
    report = {"benchmark": "tradeoff_tuned", "widths_report": str(args.widths_report), "widths": {
                  k: widths[k] for k in ("seed", "tokens", "batches", "lrs", "test_seqs", "environment")},
              "mixture_sources": [str(p) for p in args.mixtures], "protocol_results": str(args.protocol_results),
              "points": points, "matches": matches(points, curve)}
    plot(points, args.results / "tradeoff_tuned.png")
    write_results(args.results, "tradeoff_tuned", report, to_markdown(report))
    return 0


if __name__ == "__main__":
    run_main(main)
