"""What a data opt-out costs: drop each expert of a trained mixture in turn (paper-style E = 4 `cpu` run).

For every expert k: the perplexity on the test sequences routed to k before the opt-out (its segment)
and after (they fall to the best remaining router's expert), next to the dense model on the same
sequences, and the perplexity on everything else (unchanged by construction: only k's traffic moves).
One scoring pass of the bundle serves every row.

    python benchmarks/shrink_cost.py --run runs/bench-cpu-e4 [--max-seqs 0]

Writes benchmarks/results/shrink_cost.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import torch

from _results import write_results
from smalltalk.mixture.bundle import read_bundle
from smalltalk.mixture.shrink import opt_out_table

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--max-seqs", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--label", default=None, help="how the run is named in the table (default: its directory)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    E = read_bundle(args.run / "bundle").num_experts
    rows = opt_out_table(args.run / "bundle", [[k] for k in range(E)], args.run / "dense" / "model",
                         args.run / "data", max_seqs=args.max_seqs, device="cpu")
    label = args.label or args.run.name
    report = {"benchmark": "shrink_cost", "run": label, "rows": rows,
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"}
    for r in report["rows"]:
        r["bundle"] = label
    n = rows[0]["num_seqs"]
    md = [f"# Opt-out cost: each expert of `{label}` dropped in turn", "",
          f"{n} test sequences; machine {report['machine']}. Segment = the test sequences routed to the dropped expert.", "",
          "| dropped | segment share | segment ppl before | after | dense on the segment | everything else before -> after | all before -> after |",
          "|---|---|---|---|---|---|---|"]
    for r in rows:
        s, rest, a = r["dropped_segment"], r["rest"], r["all"]
        md.append(f"| expert {r['dropped'][0]} | {100 * s['num_seqs'] / n:.1f}% | {s['ppl_before']:.3f} | {s['ppl_after']:.3f} | "
                  f"{s['dense_ppl']:.3f} | {rest['ppl_before']:.3f} -> {rest['ppl_after']:.3f} | "
                  f"{a['ppl_before']:.3f} -> {a['ppl_after']:.3f} (dense {a['dense_ppl']:.3f}) |")
    write_results(RESULTS, "shrink_cost", report, "\n".join(md) + "\n", show=False)
    print("\n".join(md[-E:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
