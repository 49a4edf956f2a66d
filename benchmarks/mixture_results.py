"""The paper's main result at CPU scale: mixture vs dense test perplexity at equal training tokens/FLOPs.

For each E (default 4; also 2 and 8 with --experts 2,4,8) this is `smalltalk run --config cpu --num-experts E`
(all 10 domains of the sample corpus at a 512-token vocabulary, 42k-parameter experts of the `mini`
shape, `nano` routers, M = 32: equal training FLOPs with the routers counted, +4% inference FLOPs at
E = 4): router EM, sharding, E experts, the dense baseline (same steps, E x the batch), the bundle,
evaluation on the test split, and the run report. Every stage is resumable, so a killed benchmark
continues where it stopped when re-run with the same arguments. About 25 minutes on 2 idle CPU cores
(benchmarks/results/explore/README.md has the other settings tried); on a GPU machine
pass --device cuda. `--preset cpu-small` is the same pipeline with 5.3M-parameter experts (hours).

    python benchmarks/mixture_results.py                          # E = 4, runs/bench-cpu-e4
    python benchmarks/mixture_results.py --experts 2,4,8 --device cuda
    python benchmarks/mixture_results.py --preset cpu-long --device cuda   # ~16x the tokens: for a GPU
    python benchmarks/mixture_results.py --preset tiny --experts 4 # the quickstart's numbers, minutes

Writes benchmarks/results/mixture_results.{json,md}: per E the mixture and dense test perplexity,
the improvement (target: >= 8% lower at E = 4), whether every expert beats dense on its own segment,
the per-expert table, the FLOPs table (training and inference overhead, target inference <= +10%),
the routing-prefix sweep, wall time per stage and the machine's load average (the machine is shared).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

from _results import write_results
from smalltalk.errors import SmallTalkError
from smalltalk.io import read_json
from smalltalk.run.config import run_preset
from smalltalk.run.layout import RunLayout
from smalltalk.run.pipeline import run_pipeline

RESULTS = Path(__file__).resolve().parent / "results"
NAME = "mixture_results"
TARGETS = {"improvement_pct_at_e4": 8.0, "inference_overhead_pct_max": 10.0}


def summarize_run(run: Path, wall_s: float, load: tuple[list[float], list[float]]) -> dict:
    results = read_json(RunLayout(run).results)
    ev, costs = results["eval"], results["costs"]
    return {
        "run_dir": str(run), "num_experts": results["num_experts"], "prefix_len": results["prefix_len"],
        "test_seqs": ev["num_seqs"], "test_tokens": ev["num_tokens"],
        "mixture_ppl": ev["mixture"]["ppl"], "dense_ppl": ev["dense"]["ppl"], "improvement_pct": ev["improvement_pct"],
        "mixture_bpb": ev["mixture"].get("bpb"), "dense_bpb": ev["dense"].get("bpb"),
        "all_experts_beat_dense_on_their_segment": ev["all_experts_beat_dense_on_their_segment"],
        "per_expert": ev["per_expert"], "prefix_sweep": ev["prefix_sweep"], "oracle": ev["oracle"],
        "soft_topk": ev.get("soft_topk"), "costs": costs, "timings_s": results["timings_s"],
        "wall_s_this_invocation": round(wall_s, 1), "loadavg_before": load[0], "loadavg_after": load[1],
        "config": results["config"],
    }


def to_markdown(report: dict) -> str:
    lines = [f"# Mixture vs dense ({report['preset']} preset)", "",
             f"Sample corpus, equal training tokens (dense: same steps, E x batch). Machine: {report['machine']}; "
             f"load average before/after each run in the JSON (shared machine).", "",
             "| E | Mixture ppl | Dense ppl | Improvement | Every expert beats dense on its segment | "
             "Training FLOPs vs dense | Inference FLOPs vs dense | Wall (s) |", "|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        c = r["costs"]
        lines.append(f"| {r['num_experts']} | {r['mixture_ppl']:.3f} | {r['dense_ppl']:.3f} | {r['improvement_pct']:+.2f}% "
                     f"| {r['all_experts_beat_dense_on_their_segment']} | {c['training_overhead_pct']:+.2f}% "
                     f"| {c['inference_overhead_pct']:+.2f}% | {sum(r['timings_s'].values()):.0f} |")
    lines += ["", "Targets (issue 5, E = 4): improvement >= 8%, every expert below dense on its segment, inference "
              "FLOPs within +10% of dense.", ""]
    lines += flops_table(report["runs"])
    for r in report["runs"]:
        lines += [f"## E = {r['num_experts']}", "", "| Expert | Test share | Expert ppl | Dense ppl | Improvement |",
                  "|---|---|---|---|---|"]
        for e in r["per_expert"]:
            if e["num_seqs"]:
                lines.append(f"| {e['expert']} | {100 * e['share']:.1f}% | {e['expert_ppl']:.3f} | {e['dense_ppl']:.3f} "
                             f"| {e['improvement_pct']:+.2f}% |")
        lines += ["", "| M-hat | Mixture ppl | Improvement |", "|---|---|---|"]
        lines += [f"| {s['prefix_len']} | {s['ppl']:.3f} | {s['improvement_pct']:+.2f}% |" for s in r["prefix_sweep"]]
        lines += ["", f"Full report: `{r['run_dir']}/report.md`.", ""]
    return "\n".join(lines)


def flops_table(runs: list[dict]) -> list[str]:
    """Where the mixture's training FLOPs go (paper App. A.3: routers' EM, scoring for sharding, experts) next to
    the dense baseline's, and inference FLOPs per S-token sequence (E routers score the M-hat prefix, one expert the sequence)."""
    lines = ["## FLOPs", "", "| E | Experts training | Routers EM training | Routers scoring (EM + sharding) | "
             "Mixture total | Dense training | Mixture / dense | Inference per sequence: expert + E routers | Dense |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        c = r["costs"]
        lines.append(f"| {r['num_experts']} | {c['experts_training']:.4g} | {c['routers_training']:.4g} "
                     f"| {c['routers_sharding'] + c['experts_sharding']:.4g} | {c['mixture_training']:.4g} "
                     f"| {c['dense_training']:.4g} | {c['mixture_training'] / c['dense_training']:.4f} "
                     f"| {c['expert_inference']:.4g} + {c['routers_inference']:.4g} | {c['dense_inference']:.4g} |")
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cpu", help="run preset family: cpu (default), cpu-small, cpu-long or tiny")
    ap.add_argument("--experts", default="4", help="comma-separated numbers of experts (default 4)")
    ap.add_argument("--runs-dir", default="runs", help="run directories go to RUNS_DIR/bench-<preset>-e<E>")
    ap.add_argument("--device", default=None, help="cpu, cuda or auto (default: the preset's, auto)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (<= 2 on the shared machine)")
    ap.add_argument("--expert-workers", type=int, default=1, help="experts trained in parallel processes")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        counts = [int(x) for x in args.experts.split(",") if x.strip()]
        runs = []
        for E in counts:
            cfg = run_preset(args.preset, num_experts=E, name=f"bench-{args.preset}-e{E}", device=args.device)
            run = Path(args.runs_dir) / cfg.name
            load_before = [round(x, 2) for x in os.getloadavg()]
            start = time.perf_counter()
            run_pipeline(cfg, run, expert_workers=args.expert_workers)
            runs.append(summarize_run(run, time.perf_counter() - start,
                                      (load_before, [round(x, 2) for x in os.getloadavg()])))
    except SmallTalkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError:
        print(f"error: --experts {args.experts!r}: give comma-separated integers, e.g. 2,4,8", file=sys.stderr)
        return 2
    report = {"benchmark": NAME, "preset": args.preset, "targets": TARGETS, "runs": runs,
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                         f"torch {torch.__version__}, cuda {torch.cuda.is_available()}",
              "threads": args.threads}
    suffix = "" if args.preset == "cpu" else f"_{args.preset}"
    write_results(RESULTS, f"{NAME}{suffix}", report, to_markdown(report), show=False)
    for r in runs:
        print(f"E={r['num_experts']}: mixture ppl {r['mixture_ppl']:.3f} vs dense {r['dense_ppl']:.3f} "
              f"({r['improvement_pct']:+.2f}%), every expert better on its segment: "
              f"{r['all_experts_beat_dense_on_their_segment']}, inference FLOPs "
              f"{r['costs']['inference_overhead_pct']:+.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
