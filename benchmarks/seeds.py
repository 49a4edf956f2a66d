"""Error bars: the FLOP-fair `cpu` mixture (E = 4) vs dense over several seeds (paper §3.2, issue: results
at a scale people believe).

The seed changes router EM's initial assignment, every model's initial weights and every data order.
Each seed is `smalltalk run --config cpu` with `seed: S` (resumable: re-run the same command after an
interruption); `--from-json` adds runs measured earlier from a `mixture_results.json`.

    python benchmarks/seeds.py --seeds 1,2 --runs-dir runs --threads 1
    python benchmarks/seeds.py --seeds 1,2 --from-json benchmarks/results/mixture_results.json

Writes benchmarks/results/mixture_seeds.{json,md}: per seed mixture / dense test perplexity and the
improvement, then mean +- sample standard deviation over the seeds.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
from pathlib import Path

import torch

from _results import write_results
from smalltalk.io import read_json
from smalltalk.run.config import run_preset
from smalltalk.run.layout import RunLayout
from smalltalk.run.pipeline import run_pipeline

RESULTS = Path(__file__).resolve().parent / "results"


def row_of(results: dict, source: str) -> dict:
    ev = results["eval"]
    return {"seed": results["config"]["seed"], "source": source, "mixture_ppl": ev["mixture"]["ppl"],
            "dense_ppl": ev["dense"]["ppl"], "improvement_pct": ev["improvement_pct"],
            "every_expert_beats_dense": ev["all_experts_beat_dense_on_their_segment"],
            "test_seqs": ev["num_seqs"], "stage_seconds": round(sum(results.get("timings_s", {}).values()), 1)}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else float("nan"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--seeds", default="1,2", help="seeds to run (comma-separated)")
    ap.add_argument("--runs-dir", type=Path, default=Path("runs"), help="run directories go under RUNS_DIR")
    ap.add_argument("--name", default="{preset}-seed{seed}", help="run name / directory (default %(default)s)")
    ap.add_argument("--from-json", type=Path, help="a mixture_results.json whose E = 4 run is added (its own seed)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-run", action="store_true", help="only summarize finished runs")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    if args.from_json:
        for r in read_json(args.from_json)["runs"]:
            if r["num_experts"] == 4:
                rows.append(row_of({"eval": {"mixture": {"ppl": r["mixture_ppl"]}, "dense": {"ppl": r["dense_ppl"]},
                                             "improvement_pct": r["improvement_pct"], "num_seqs": r["test_seqs"],
                                             "all_experts_beat_dense_on_their_segment":
                                                 r["all_experts_beat_dense_on_their_segment"]},
                                    "config": r["config"], "timings_s": r["timings_s"]}, args.from_json.name))
    for seed in [int(s) for s in args.seeds.split(",") if s.strip()]:
        cfg = run_preset(args.preset, name=args.name.format(preset=args.preset, seed=seed), seed=seed)
        run = args.runs_dir / cfg.name
        if not args.no_run:
            run_pipeline(cfg, run)
        layout = RunLayout(run)
        if layout.results.is_file():
            rows.append(row_of(read_json(layout.results), f"run {run.name}"))
    if not rows:
        print(f"error: no finished runs: looked for {args.runs_dir}/{args.name} (results.json) with seeds {args.seeds}"
              + (f" and E = 4 in {args.from_json}" if args.from_json else "") + "; check --runs-dir and --name",
              file=sys.stderr)
        return 2
    rows.sort(key=lambda r: r["seed"])
    improvement = mean_std([r["improvement_pct"] for r in rows])
    mixture = mean_std([r["mixture_ppl"] for r in rows])
    dense = mean_std([r["dense_ppl"] for r in rows])
    report = {"benchmark": "mixture_seeds", "preset": args.preset, "runs": rows, "num_seeds": len(rows),
              "improvement_pct": {"mean": improvement[0], "std": improvement[1]},
              "mixture_ppl": {"mean": mixture[0], "std": mixture[1]}, "dense_ppl": {"mean": dense[0], "std": dense[1]},
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
              "loadavg": [round(x, 2) for x in os.getloadavg()]}
    md = [f"# Mixture vs dense over seeds (`{args.preset}` preset, E = 4)", "",
          f"Machine: {report['machine']}. The seed changes EM's initial assignment, initial weights and data order.", "",
          "| seed | mixture ppl | dense ppl | improvement | every expert beats dense | test seqs | source |",
          "|---|---|---|---|---|---|---|"]
    md += [f"| {r['seed']} | {r['mixture_ppl']:.3f} | {r['dense_ppl']:.3f} | {r['improvement_pct']:+.2f}% | "
           f"{r['every_expert_beats_dense']} | {r['test_seqs']} | `{r['source']}` |" for r in rows]
    md += ["", f"Over {len(rows)} seeds: mixture {mixture[0]:.2f} +- {mixture[1]:.2f}, dense {dense[0]:.2f} +- "
               f"{dense[1]:.2f}, improvement **{improvement[0]:+.1f}% +- {improvement[1]:.1f}** (mean +- sample std).", ""]
    write_results(RESULTS, "mixture_seeds", report, "\n".join(md), show=False)
    print(md[-2])
    return 0


if __name__ == "__main__":
    sys.exit(main())
