"""Sharding wall time and peak memory: route every train sequence of a prepared dataset to E experts.

Runs `smalltalk shard` (1 process, or `--workers 2` under torchrun) as a child process and records its
wall time, sequences/s and peak resident memory (max RSS of the children). Routers come from
`--routers`, or are trained first with the `tiny` router EM preset (not timed).

    python benchmarks/routing_sharding.py --data runs/data-cpu            # the full sample corpus (cpu preset)
    python benchmarks/routing_sharding.py                                 # default: prepares the tiny preset

Writes benchmarks/results/routing_sharding.json and .md.
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="prepared data directory (default: prepare the tiny preset)")
    parser.add_argument("--routers", type=Path, help="routers directory (default: train tiny routers first)")
    parser.add_argument("--num-experts", type=int, default=4)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="torch threads per worker")
    parser.add_argument("--chunk-size", type=int, default=4096)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()


    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = args.data
        if data is None:
            data = tmp / "data-tiny"
            subprocess.run([sys.executable, "-m", "smalltalk", "prepare", "--preset", "tiny", "--out", str(data),
                            "--no-progress"], check=True)
        routers = args.routers
        if routers is None:
            subprocess.run([sys.executable, "-m", "smalltalk", "train-routers", "--data", str(data), "--out",
                            str(tmp / "em"), "--preset", "tiny", "--num-experts", str(args.num_experts),
                            "--threads", str(args.threads), "--device", "cpu"], check=True)
            routers = tmp / "em" / "routers"
        launcher = [sys.executable, "-m", "smalltalk"] if args.workers == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.workers),
            "-m", "smalltalk"]
        load_before = os.getloadavg()
        # A wrapper process measures the peak RSS of the sharding processes alone (not of router training).
        wrapper = [sys.executable, "-c", "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
                   "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)"]
        t = time.perf_counter()
        res = subprocess.run([*wrapper, *launcher, "shard", "--data", str(data), "--routers", str(routers), "--out",
                              str(tmp / "out"), "--chunk-size", str(args.chunk_size), "--threads", str(args.threads)],
                             check=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)},
                             stdout=subprocess.PIPE, text=True)
        wall = time.perf_counter() - t
        print(res.stdout)
        peak_rss_mb = int(res.stdout.rsplit("MAXRSS_KB", 1)[1].split()[0]) / 1024
        manifest = json.loads((tmp / "out" / "manifest.json").read_text())
        rmanifest = json.loads((routers / "manifest.json").read_text())
        data_manifest = json.loads((data / "manifest.json").read_text())
    info = manifest["splits"]["train"]
    result = {
        "benchmark": "routing_sharding", "data": str(data), "seq_len": data_manifest["seq_len"],
        "vocab_size": data_manifest["vocab_size"], "train_seqs": info["num_seqs"],
        "train_tokens": info["num_seqs"] * data_manifest["seq_len"], "num_experts": manifest["num_experts"],
        "prefix_len": manifest["prefix_len"], "router_preset": rmanifest["em"]["router_preset"],
        "workers": args.workers, "threads_per_worker": args.threads, "chunk_size": args.chunk_size,
        "wall_s": wall, "seqs_per_s": info["num_seqs"] / wall,
        "peak_rss_mb_max_child": peak_rss_mb, "counts": info["counts"],
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
    }
    md = (f"# Sharding ({result['train_seqs']} train sequences x {result['seq_len']} tokens, vocab "
          f"{result['vocab_size']}, E = {result['num_experts']} {result['router_preset']} routers, M = "
          f"{result['prefix_len']})\n\n| workers | threads | wall s | seq/s | peak RSS (MB, largest process) | "
          f"experts |\n|---|---|---|---|---|---|\n| {args.workers} | {args.threads} | {wall:.1f} | "
          f"{result['seqs_per_s']:.0f} | {peak_rss_mb:.0f} | {info['counts']} |\n\nLoad average before "
          f"{load_before[0]:.2f} (shared machine).\n")
    write_results(args.results, "routing_sharding", result, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
