"""Bytes exchanged per worker in a 2-worker router EM run vs the paper's App. A.4 formula.

Runs `torchrun --nproc_per_node 2 -m smalltalk train-routers` (gloo, CPU) on a prepared data directory
for each score precision, then compares the bytes each worker counted (routing/distributed.py: payload
of the score all-gather, ring accounting) with routing/comm.py's estimates for the same settings:
  * paper:     2 (send + receive) x bytes_per_score x N per router per exchange (App. A.4);
  * allgather: (P - 1) / P x N x E x bytes_per_score each way per worker (the exact all-gather volume).
"Routing" bytes count only the N routed sequences; the run also exchanges the held-out probe scores
and one row of training losses per iteration, for its log.

    python benchmarks/routing_comm.py --data runs/data-tiny          # default: prepares the tiny preset

Writes benchmarks/results/routing_comm.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _results import write_results

RESULTS = Path(__file__).resolve().parent / "results"


def ensure_data(data: Path | None, cache: Path) -> Path:
    if data is not None:
        return data
    out = cache / "data-tiny"
    subprocess.run([sys.executable, "-m", "smalltalk", "prepare", "--preset", "tiny", "--out", str(out),
                    "--no-progress"], check=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="prepared data directory (default: prepare the tiny preset)")
    parser.add_argument("--num-experts", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()


    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = ensure_data(args.data, Path(tmp))
        for dtype in ("float32", "float16"):
            out = Path(tmp) / f"run-{dtype}"
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            "-m", "smalltalk", "train-routers", "--data", str(data), "--out", str(out), "--preset",
                            "tiny", "--num-experts", str(args.num_experts), "--iterations", str(args.iterations),
                            "--score-dtype", dtype, "--threads", "1", "--device", "cpu"], check=True, env=env)
            wall = time.perf_counter() - t
            comm = json.loads((out / "routers" / "comm.json").read_text())
            est = comm["estimate"]
            for r in comm["ranks"]:
                n = r["exchanges"]
                rows.append({
                    "score_dtype": dtype, "rank": r["rank"], "exchanges": n, "wall_s": wall,
                    "sequences_per_exchange": comm["sequences_per_exchange"],
                    "measured_bytes_sent": r["bytes_sent"], "measured_bytes_received": r["bytes_received"],
                    "measured_routing_bytes_sent": r["routing_bytes_sent"],
                    "paper_bytes_per_router_total": est["paper_bytes_per_router_total"],
                    "allgather_bytes_per_worker_total": est["allgather_bytes_per_worker_total"],
                    "routing_over_allgather": r["routing_bytes_sent"] / est["allgather_bytes_per_worker_total"],
                })
    result = {"benchmark": "routing_comm", "world_size": 2, "num_experts": args.num_experts,
              "iterations": args.iterations, "loadavg": os.getloadavg(), "rows": rows}
    lines = [f"# Score exchange per worker: 2 workers, E = {args.num_experts}, {args.iterations} EM iterations", "",
             "| dtype | rank | exchanges | N / exchange | sent (all) | sent (routing) | paper per router | "
             "all-gather estimate | routing / estimate |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['score_dtype']} | {r['rank']} | {r['exchanges']} | {r['sequences_per_exchange']} | "
                     f"{r['measured_bytes_sent']} | {r['measured_routing_bytes_sent']} | "
                     f"{r['paper_bytes_per_router_total']:.0f} | {r['allgather_bytes_per_worker_total']:.0f} | "
                     f"{r['routing_over_allgather']:.2f} |")
    lines += ["", "Bytes are payload bytes (ring accounting: each worker sends and receives P - 1 blocks of its "
              "padded share). With E divisible by P the routing bytes equal the all-gather estimate exactly; "
              "the paper's per-router figure counts one score per sequence each way."]
    write_results(args.results, "routing_comm", result, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
