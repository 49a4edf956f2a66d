"""Router prefix-scoring throughput: all E routers batched (routing/score.py) vs a plain loop over routers.

For E = 4, 8, 16 routers of a preset, scores N sequences on their first M tokens three ways, in the
same process:
  * batched    `StackedRouters`: one forward of all E routers (stacked parameters, the model's forward vmapped,
               chunked output head);
  * loop       a Python loop over routers, each a plain `Transformer.forward` (full logits) +
               cross-entropy: what one writes without batching;
  * loop-same  a loop over routers through the same code as batched with E = 1 (separates the
               effect of batching routers from that of the chunked head).
FLOP utilisation = paper Eq. 11 FLOPs (S = M, one sequence, one router) x N x E / time / the fp32
matmul rate measured in the same run (n x n @ n x n). The machine may be shared: the load average
is recorded before and after.

Targets (CPU): batched >= 3x the loop at E = 16, utilisation >= 0.3.

    python benchmarks/routing_scoring.py                     # router-4.4m (V 32000) and cpu-router, M = 256
    python benchmarks/routing_scoring.py --device cuda

Writes benchmarks/results/routing_scoring{,_cuda}.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from _results import write_results

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_SPEEDUP, TARGET_UTIL = 3.0, 0.3


def matmul_rate(device, n: int = 2048, repeats: int = 5) -> float:
    import torch

    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    sync()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(3):
            a @ b
        sync()
        best = min(best, (time.perf_counter() - t) / 3)
    return 2 * n ** 3 / best


def timed(fn, device, repeats: int) -> float:
    import torch

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = float("inf")
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def bench(preset_name: str, E: int, M: int, N: int, batch: int, device, repeats: int, rate: float) -> dict:
    import numpy as np
    import torch

    from smalltalk.model.config import preset
    from smalltalk.model.flops import inference_flops
    from smalltalk.model.transformer import Transformer
    from smalltalk.routing.score import StackedRouters, prefix_scores, prefix_scores_loop

    cfg = preset(preset_name, max_seq_len=max(M, 16))
    torch.manual_seed(0)
    models = [Transformer(cfg).to(device).eval() for _ in range(E)]
    tokens = torch.randint(0, cfg.vocab_size, (N, M), generator=torch.Generator().manual_seed(0)).to(device)
    stacked = StackedRouters(models, device=device)
    singles = [StackedRouters([m], device=device) for m in models]
    out = {}
    out["batched"] = timed(lambda: prefix_scores(stacked, tokens, M, batch_size=batch), device, repeats)
    out["loop"] = timed(lambda: prefix_scores_loop(models, tokens, M, batch_size=batch), device, repeats)
    out["loop_same"] = timed(lambda: [prefix_scores(s, tokens, M, batch_size=batch) for s in singles], device, repeats)
    check = np.abs(prefix_scores(stacked, tokens[:2], M) - prefix_scores_loop(models, tokens[:2], M)).max()
    flops = inference_flops(cfg, M) * N * E
    row = {"preset": preset_name, "vocab": cfg.vocab_size, "E": E, "M": M, "N": N, "batch": batch,
           "max_abs_diff_vs_loop": float(check)}
    for k, t in out.items():
        row[f"{k}_s"] = t
        row[f"{k}_seqs_per_s"] = N / t
        row[f"{k}_util"] = flops / t / rate
    row["speedup_vs_loop"] = out["loop"] / out["batched"]
    row["speedup_vs_loop_same"] = out["loop_same"] / out["batched"]
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--experts", default="4,8,16")
    parser.add_argument("--presets", default="router-4.4m,cpu-router")
    parser.add_argument("--prefix-len", type=int, default=256)
    parser.add_argument("--seqs", type=int, default=0, help="sequences per measurement (default: per preset)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--head-chunk-mb", type=float, default=0, help="override score.HEAD_CHUNK_BYTES (MiB)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="directory for the .json / .md results")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    if args.head_chunk_mb:
        import smalltalk.routing.score as score

        score.HEAD_CHUNK_BYTES = int(args.head_chunk_mb * 2**20)
    device = torch.device(args.device)
    load_before = os.getloadavg()
    rate = matmul_rate(device)
    rows = []
    for name in args.presets.split(","):
        N = args.seqs or {"router-4.4m": 8, "cpu-router": 32}.get(name, 32)
        if device.type == "cuda":
            N *= 16
        for E in [int(x) for x in args.experts.split(",")]:
            row = bench(name, E, args.prefix_len, N, args.batch_size, device, args.repeats, rate)
            rows.append(row)
            print(f"{name} E={E:2d}: batched {row['batched_seqs_per_s']:.1f} seq/s (util {row['batched_util']:.2f}), "
                  f"loop {row['loop_seqs_per_s']:.1f} seq/s (util {row['loop_util']:.2f}), "
                  f"loop-same {row['loop_same_seqs_per_s']:.1f} seq/s -> {row['speedup_vs_loop']:.2f}x vs loop, "
                  f"{row['speedup_vs_loop_same']:.2f}x vs loop-same", flush=True)
    load_after = os.getloadavg()
    e16 = [r for r in rows if r["E"] == 16] or [{"speedup_vs_loop": 0.0}]
    result = {
        "benchmark": "routing_scoring", "device": str(device), "threads": args.threads,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "head_chunk_bytes": __import__("smalltalk.routing.score", fromlist=["x"]).HEAD_CHUNK_BYTES,
        "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
        "matmul_fp32_flops_per_s": rate, "loadavg_before": load_before, "loadavg_after": load_after,
        "targets": {"speedup_vs_loop_at_E16": TARGET_SPEEDUP, "utilisation": TARGET_UTIL},
        "met": {"speedup_vs_loop_at_E16": all(r["speedup_vs_loop"] >= TARGET_SPEEDUP for r in e16),
                "utilisation": all(r["batched_util"] >= TARGET_UTIL for r in rows)},
        "rows": rows,
    }
    suffix = "" if device.type == "cpu" else f"_{device.type}"
    lines = [f"# Router prefix scoring ({device}, {args.threads} threads, M = {args.prefix_len})", "",
             f"fp32 matmul rate {rate / 1e9:.1f} GFLOP/s; load average before {load_before[0]:.2f}, "
             f"after {load_after[0]:.2f} (shared machine).", "",
             "| preset | E | N | batched seq/s | util | loop seq/s | util | loop-same seq/s | x loop | x loop-same |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['E']} | {r['N']} | {r['batched_seqs_per_s']:.1f} | {r['batched_util']:.2f} "
                     f"| {r['loop_seqs_per_s']:.1f} | {r['loop_util']:.2f} | {r['loop_same_seqs_per_s']:.1f} "
                     f"| {r['speedup_vs_loop']:.2f} | {r['speedup_vs_loop_same']:.2f} |")
    lines += ["", f"Targets: >= {TARGET_SPEEDUP}x the loop at E = 16 (met: {result['met']['speedup_vs_loop_at_E16']}), "
              f"utilisation >= {TARGET_UTIL} (met: {result['met']['utilisation']})."]
    write_results(args.results, f"routing_scoring{suffix}", result, "\n".join(lines) + "\n", show=False)
    print(json.dumps(result["met"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
