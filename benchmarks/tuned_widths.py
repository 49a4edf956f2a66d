"""Tuned dense models of other widths at one map budget: the width curve of the tuned trade-off (paper Figure 2).

A one-budget map report (`map.py --budgets X`, e.g. tuned_cpu_seed0.json) fixes the base run, the training tokens
and the test sequences; here dense models of the same architecture at other hidden sizes train on exactly those
tokens, each tuned on its own coarse grid (batch x peak lr, warm-up-stable-decay like the map's lines), selected on
the map's validation sequences and scored on its test sequences. The report's own tuned dense model is the curve's
first point, so the curve compares like with like.

    python benchmarks/tuned_widths.py --map-report benchmarks/results/tuned_cpu_seed0.json --widths 48,64 \\
        --lrs 0.005,0.01 --out runs/tuned-widths

Each line trains under OUT/h<W>/ and resumes when re-run; processes sweeping disjoint --lrs into one OUT never read
each other's lines, and a last run over the whole grid writes benchmarks/results/NAME.{json,md}
(default tuned_widths_<map report stem>).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
from pathlib import Path

import torch

from _results import run_main, write_results
from map import SIZES, Line, Plan, line_point, routed_ppl, run_line
from smalltalk.errors import SmallTalkError
from smalltalk.io import atomic_write_json, read_json
from smalltalk.model.flops import inference_flops, training_flops
from smalltalk.run.layout import RunLayout, read_run_config

RESULTS = Path(__file__).resolve().parent / "results"


def map_budget(report: dict, path: Path) -> dict:
    if len(report["budgets"]) != 1:
        raise SmallTalkError(f"{path}: {len(report['budgets'])} budgets; give a one-budget map report "
                             "(map.py --budgets X)")
    return report["budgets"][0]


def width_plan(base_run: Path, report: dict, width: int) -> Plan:
    """The map's plan at one budget with the dense model `width` wide (layers, heads, vocabulary unchanged)."""
    from smalltalk.data.manifest import read_data_manifest

    data = read_data_manifest(RunLayout(base_run).data)
    model = read_run_config(base_run).expert_model.replace(
        **{**SIZES[report["size"]], "hidden_size": width}, vocab_size=data.vocab_size, max_seq_len=data.seq_len,
        name=f"dense-h{width}")
    b = report["budgets"][0]
    return Plan(model, report["num_experts"], data.seq_len, (b["tokens_per_param"],), (b["total_seqs"],),
                report["decay_fraction"], report["seed"])


def sweep_width(plan: Plan, lines: list[Line], train, valid, v_idx, out: Path, log) -> list[dict]:
    """Every line of one width trained to the budget and scored on the validation subset (cached per line)."""
    points = []
    for line in lines:
        start = plan.train_config(line, 0, 0, "").decay_start
        run_line(plan, line, train, out, None, [start], log)
        points.append(line_point(plan, line, 0, start, train, [], out, valid, v_idx, None, log))
        log(f"{out.name} {line.name}: valid ppl {points[-1]['valid_ppl']:.3f}")
    return points


def costs(plan: Plan, steps: int, batch: int) -> dict:
    return {"params": plan.params, "model": plan.model.to_dict(), "seq_len": plan.seq_len,
            "training_flops": training_flops(plan.model, steps, batch, plan.seq_len - 1),
            "inference_flops": inference_flops(plan.model, plan.seq_len)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--map-report", type=Path, required=True,
                    help="a one-budget map report (its tuned dense is the curve's first width)")
    ap.add_argument("--widths", default="48,64", help="hidden sizes of the wider dense models")
    ap.add_argument("--batches", default="", help="batch sizes (default: the report's dense batches)")
    ap.add_argument("--lrs", default="", help="peak learning rates (default: the report's)")
    ap.add_argument("--base-run", type=Path, default=None, help="the report's base run, if it moved")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="", help="results stem (default tuned_widths_<report stem>)")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    from smalltalk.data.splits import evenly_spaced, load_split

    report = read_json(args.map_report)
    own = map_budget(report, args.map_report)
    base_run = args.base_run or Path(report["base_run"])
    if not RunLayout(base_run).shards_manifest.is_file():
        raise SmallTalkError(f"{base_run}: not the report's base run (not sharded); pass --base-run")
    floats = lambda s: [float(x) for x in s.split(",") if x]  # noqa: E731
    widths = [int(w) for w in args.widths.split(",") if w]
    batches = [int(b) for b in args.batches.split(",") if b] or report.get("side_batches", {}).get("dense") \
        or report["batches"]
    lrs = floats(args.lrs) or report["lrs"]
    own_width = SIZES[report["size"]]["hidden_size"]
    if any(w <= 0 or w == own_width for w in widths):
        raise SmallTalkError(f"--widths {args.widths}: each must be positive and not the report's own {own_width}")
    layout = RunLayout(base_run)
    train = load_split(layout.data, "train")
    valid, test = load_split(layout.data, "valid").dataset, load_split(layout.data, "test").dataset
    v_idx, t_idx = evenly_spaced(len(valid), report["valid_seqs"]), evenly_spaced(len(test), report["test_seqs"])

    dense_line = own["lines"]["dense"]
    best_own = next(p for p in report["points"] if p["side"] == "dense" and
                    Line("dense", p["batch_size"], p["lr"]).name == dense_line)
    own_plan = width_plan(base_run, report, own_width)
    rows = [{"hidden_size": own_width, "source": str(args.map_report), "best": dense_line,
             "valid_ppl": best_own["valid_ppl"], "test_ppl": own["dense_ppl"],
             "points": [p for p in report["points"] if p["side"] == "dense"],
             **costs(own_plan, best_own["steps"], best_own["batch_size"])}]
    for width in widths:
        plan = width_plan(base_run, report, width)
        out = args.out / f"h{width}"
        points = sweep_width(plan, [Line("dense", b, lr) for lr in lrs for b in batches], train, valid, v_idx, out, log)
        best = min(points, key=lambda p: p["valid_ppl"])
        line = Line("dense", best["batch_size"], best["lr"])
        cache = out / "budgets" / "0" / f"test_{line.name}.json"
        if not cache.is_file():
            atomic_write_json(cache, {"test_ppl": routed_ppl([out / "budgets" / "0" / line.name / "dense" / "model"],
                                                             test, t_idx, None)["ppl"]})
        rows.append({"hidden_size": width, "best": line.name, "valid_ppl": best["valid_ppl"],
                     "test_ppl": read_json(cache)["test_ppl"], "points": points,
                     **costs(plan, best["steps"], best["batch_size"])})
        log(f"h{width}: best {line.name}, test ppl {rows[-1]['test_ppl']:.3f}")
    result = {"benchmark": "tuned_widths", "map_report": str(args.map_report), "base_run": str(base_run),
              "num_experts": report["num_experts"], "seed": report["seed"], "tokens": own["tokens"],
              "tokens_per_expert_param": own["tokens_per_param"],
              "total_seqs": own["total_seqs"], "decay_fraction": report["decay_fraction"], "batches": batches,
              "lrs": lrs, "valid_seqs": report["valid_seqs"], "test_seqs": len(t_idx), "widths": rows,
              "environment": {"machine": platform.machine(), "cpus": os.cpu_count(), "threads": args.threads,
                              "torch": torch.__version__}}
    write_results(args.results, args.name or f"tuned_widths_{args.map_report.stem}", result, render(result))
    return 0


def render(result: dict) -> str:
    lines = [f"# Tuned dense models of other widths, {result['tokens']:,} training tokens", "",
             f"Base run `{result['base_run']}` (seed {result['seed']}); every width trained on the same "
             f"{result['total_seqs']:,} sequences as the map report `{result['map_report']}`, tuned on batch "
             f"{result['batches']} x peak lr {result['lrs']} (WSD, decay over the last {result['decay_fraction']:g}), "
             f"selected on {result['valid_seqs']:,} validation sequences; test ppl on {result['test_seqs']:,} test "
             "sequences. The first row is the report's own tuned dense model (its grid).", "",
             "| hidden | params | tokens / param | valid ppl per line | best line | test ppl | training FLOPs | "
             "inference FLOPs / seq |", "|---|---|---|---|---|---|---|---|"]
    for r in result["widths"]:
        grid = ", ".join(f"b{p['batch_size']} lr{p['lr']:g}: {p['valid_ppl']:.2f}"
                         for p in sorted(r["points"], key=lambda p: (p["lr"], p["batch_size"])))
        lines.append(f"| {r['hidden_size']} | {r['params']:,} | {result['tokens'] / r['params']:.0f} | {grid} | "
                     f"{r['best']} | {r['test_ppl']:.2f} | {r['training_flops']:.3e} | {r['inference_flops']:.3e} |")
    env = result["environment"]
    lines += ["", f"{env['cpus']} CPUs ({env['machine']}), {env['threads']} torch threads, torch {env['torch']}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run_main(main)
