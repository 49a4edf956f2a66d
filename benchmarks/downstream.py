"""Downstream results: mixture vs dense on BLiMP (67 paradigms), HellaSwag and GSM8K (paper §3.3, App. B).

Runs `smalltalk eval-downstream` on a `smalltalk run` directory (its bundle and dense baseline) with
the local eval data through lm-evaluation-harness, and records the side-by-side table, the BLiMP mean
and per-paradigm wins, the share of tasks where the mixture is better or equal (paper: 75%), the
per-expert routing counts, wall time, requests per second and the machine's load average (shared).
Tiny CPU models are near chance on HellaSwag (25%) and GSM8K (0%); what is measured is reported.

    python benchmarks/downstream.py --run-dir runs/cpu                       # full: 67k BLiMP pairs, 10k HellaSwag
    python benchmarks/downstream.py --run-dir runs/cpu --limit 100 --out /tmp/ds   # quick look, run dir untouched

Writes benchmarks/results/<name>.{json,md} (``--name``, default ``downstream``: the `cpu` run's; e.g.
``--name downstream_cpu-medium`` for another preset); without --out also RUN/eval/downstream.{json,md} and a
section of RUN/report.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from smalltalk.errors import SmallTalkError  # noqa: E402
from smalltalk.evaluation.downstream import DownstreamConfig, run_downstream  # noqa: E402
from smalltalk.evaluation.downstream_report import to_markdown  # noqa: E402
from _results import write_results  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", required=True, help="a `smalltalk run` directory (bundle/ and dense/model/)")
    ap.add_argument("--tasks", default="blimp,hellaswag,gsm8k", help="comma-separated (default: %(default)s)")
    ap.add_argument("--limit", type=int, default=None, help="items per task (default: all)")
    ap.add_argument("--out", default=None, help="write lm-eval outputs here instead of RUN/eval (RUN untouched)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-gen-toks", type=int, default=256)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (<= 2 on the shared machine)")
    ap.add_argument("--results", type=Path, default=RESULTS, help="directory of the JSON + Markdown")
    ap.add_argument("--name", default="downstream", help="file stem of the JSON + Markdown (default: %(default)s)")
    ap.add_argument("--fresh", action="store_true", help="evaluate both sides again instead of reusing the ones "
                                                          "saved by an interrupted run (same models and settings)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    run = Path(args.run_dir)
    common = dict(tasks=args.tasks, limit=args.limit, batch_size=args.batch_size, max_gen_toks=args.max_gen_toks,
                  device=args.device, resume=not args.fresh)
    try:
        if args.out:
            cfg = DownstreamConfig(bundle=str(run / "bundle"), dense=str(run / "dense" / "model"), out=args.out,
                                   **common)
        else:
            cfg = DownstreamConfig(run_dir=str(run), **common)
        load_before = list(os.getloadavg())
        start = time.perf_counter()
        report = run_downstream(cfg, log=print)
    except SmallTalkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    wall = time.perf_counter() - start
    cmp_ = report["comparison"]
    requests = sum(sum(c.values()) for t, c in (cmp_["routing"] or {}).get("requests", {}).items()
                   if not t.startswith("blimp (all"))
    result = {
        "benchmark": "downstream",
        "run_dir": str(run.resolve()),
        "tasks": report["lm_eval_tasks"],
        "limit": args.limit,
        "prefix_len": report["prefix_len"],
        "num_experts": (cmp_["routing"] or {}).get("num_experts"),
        "summary": cmp_["summary"],
        "blimp": cmp_["blimp"],
        "rows": cmp_["rows"],
        "routing": cmp_["routing"],
        "seconds": {**report["seconds"], "total": round(wall, 1)},
        "mixture_requests_per_s": round(requests / report["seconds"]["mixture"], 1) if "mixture" in report["seconds"]
        else None,
        "environment": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                        "device": args.device, "python": platform.python_version(), "lm_eval": report["lm_eval_version"],
                        "loadavg_before": load_before, "loadavg_after": list(os.getloadavg())},
    }
    env = result["environment"]
    head = ["# Downstream benchmark: mixture vs dense (paper App. B)", "",
            f"Run `{run}`, {result['num_experts']} experts, routing prefix {result['prefix_len']} tokens; "
            f"{f'limit {args.limit} items per task' if args.limit else 'all items of every task'}; wall {wall:.0f} s (mixture {report['seconds'].get('mixture')} s, "
            f"dense {report['seconds'].get('dense')} s), {env['torch_threads']} torch threads on {env['cpus']} CPUs, "
            f"load average {env['loadavg_before'][0]:.1f} -> {env['loadavg_after'][0]:.1f} (shared machine).",
            "", "Reproduce: `python benchmarks/downstream.py --run-dir RUN" +
            (f" --limit {args.limit}" if args.limit else "") +
            (f" --name {args.name}" if args.name != "downstream" else "") + "`", ""]
    write_results(args.results, args.name, result, "\n".join(head) + "\n" + to_markdown(report))
    s = cmp_["summary"]
    print(f"downstream: mixture better or equal on {s['mixture_better'] + s['ties']}/{s['tasks']} tasks "
          f"({100 * (s['better_or_equal_rate'] or 0):.0f}%); BLiMP mean "
          + (f"mixture {cmp_['blimp'].get('mixture_mean'):.4f} vs dense {cmp_['blimp'].get('dense_mean'):.4f}"
             if cmp_["blimp"] else "n/a")
          + f"; {wall:.0f} s; wrote {args.results / (args.name + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
