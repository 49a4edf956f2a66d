"""Training throughput: tokens/s, MFU and peak memory per preset, through the real Trainer.

MFU = model FLOPs per second (paper Eq. 10 training FLOPs per step / median step time) / the
matmul rate of this machine, measured in the same run with a large square matmul in the training
precision (fp32 on CPU, bf16 on CUDA), median of timings taken just before and just after the
steps. Each preset runs in its own child process so its peak memory (max
RSS on CPU, max allocated on CUDA) is its own.

Targets: MFU >= 0.35 for `cpu-small` on CPU; bf16 MFU >= 0.40 for `expert-335m` at seq 1024 on a GPU.

    python benchmarks/train_throughput.py                               # CPU: tiny, cpu-small
    python benchmarks/train_throughput.py --device cuda --preset expert-335m   # eager and compiled

Writes benchmarks/results/train_throughput{,_cuda}.json and .md. Token values do not affect speed,
so the default data is a shard of uniform random tokens (``--data DIR`` uses a prepared directory).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Runnable from a plain checkout (no install): the package lives in ../src.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from _results import write_results  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = {("cpu", "cpu-small"): 0.35, ("cuda", "expert-335m"): 0.40}
# Per preset: (batch size, train preset) used by default; the CPU batches fill the cores without
# exceeding the cache-friendly sizes, the GPU one is the paper's per-GPU expert batch share.
DEFAULT_BATCH = {"tiny": 16, "cpu-router": 32, "cpu-small": 16, "router-4.4m": 32, "expert-335m": 16,
                 "expert-1.3b": 8}


def matmul_times(device: str, dtype_name: str, n: int, repeats: int) -> list[float]:
    """Seconds per n x n @ n x n matmul (2 n^3 FLOPs), one figure per timed batch of products."""
    import torch

    dtype = getattr(torch, dtype_name)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(2):
        a @ b
    sync()
    times = []
    inner = 10 if device.startswith("cuda") else 3
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            a @ b
        sync()
        times.append((time.perf_counter() - start) / inner)
    return times


def run_child(args: argparse.Namespace) -> dict:
    """Train `args.preset` for warmup + steps optimizer steps in this process; print one JSON line."""
    import numpy as np
    import torch

    from smalltalk.data.shards import TokenDataset, write_shard
    from smalltalk.model.config import preset
    from smalltalk.train.config import train_preset
    from smalltalk.train.trainer import Trainer

    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model_cfg = preset(args.preset)
    seq_len = args.seq_len or model_cfg.max_seq_len
    model_cfg = model_cfg.replace(max_seq_len=seq_len)
    batch = args.batch_size or DEFAULT_BATCH.get(args.preset, 16)
    steps_total = args.warmup + args.steps
    with tempfile.TemporaryDirectory() as tmp:
        if args.data:
            data = TokenDataset.from_dir(Path(args.data) / "train")
            model_cfg = model_cfg.replace(vocab_size=data.vocab_size)
            seq_len = data.seq_len
            model_cfg = model_cfg.replace(max_seq_len=seq_len)
        else:
            rng = np.random.default_rng(0)
            num_seqs = max(batch * steps_total, 64)
            tokens = rng.integers(0, model_cfg.vocab_size, size=(num_seqs, seq_len + 1))
            write_shard(Path(tmp) / "train" / "shard_00000.bin", tokens, None, model_cfg.vocab_size)
            data = TokenDataset.from_dir(Path(tmp) / "train")
        train_cfg = train_preset("tiny", batch_size=batch, grad_accum=args.grad_accum, max_steps=steps_total,
                                 warmup_steps=1, eval_every=0, checkpoint_every=0, device=args.device,
                                 precision=args.precision, compile=args.compile)
        trainer = Trainer(model_cfg, train_cfg, data, Path(tmp) / "run", resume=False)
        device = trainer.device
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        dtype_name = "bfloat16" if trainer.autocast_dtype is not None else "float32"
        for _ in range(args.warmup):
            trainer.train_step()
        # On a shared machine the load changes from second to second, so the matmul rate is sampled
        # before and after the timed steps, and both sides use medians (a step's loss.item() syncs CUDA).
        mm_times = matmul_times(str(device), dtype_name, args.matmul_n, repeats=5)
        step_times = []
        sync()
        for _ in range(args.steps):
            start = time.perf_counter()
            trainer.train_step()
            sync()
            step_times.append(time.perf_counter() - start)
        mm_times += matmul_times(str(device), dtype_name, args.matmul_n, repeats=5)
        if device.type == "cuda":
            peak_bytes = torch.cuda.max_memory_allocated(device)
        else:
            peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    step_s = float(np.median(step_times))
    peak = 2 * args.matmul_n ** 3 / float(np.median(mm_times))
    flops_per_s = trainer.flops_per_step / step_s
    return {
        "preset": args.preset, "params": model_cfg.num_params(), "vocab_size": model_cfg.vocab_size,
        "seq_len": seq_len, "batch_size": batch, "grad_accum": args.grad_accum, "steps_timed": args.steps,
        "device": str(device), "precision": dtype_name, "compile": bool(args.compile), "threads": args.threads,
        "step_s": step_s, "step_s_mean": float(np.mean(step_times)),
        "tokens_per_s": trainer.tokens_per_step / step_s,
        "matmul_flops_per_s_best": 2 * args.matmul_n ** 3 / min(mm_times),
        "model_flops_per_s": flops_per_s, "matmul_flops_per_s": peak, "matmul_n": args.matmul_n,
        "mfu": flops_per_s / peak, "mfu_vs_best_matmul": flops_per_s * min(mm_times) / (2 * args.matmul_n ** 3),
        "peak_memory_mib": peak_bytes / 2 ** 20,
        "eq10_flops_per_step": trainer.flops_per_step,
        "data": str(args.data) if args.data else "synthetic uniform tokens",
    }


def to_markdown(result: dict) -> str:
    lines = [
        "# Training throughput", "",
        f"Machine: {result['machine']}, {result['cpu_count']} CPUs, torch {result['torch']}; "
        f"load average before/after: {result['loadavg_before']} / {result['loadavg_after']} "
        "(the machine is shared; numbers are indicative).", "",
        "MFU = Eq. 10 training FLOPs per second / measured square-matmul rate in the training precision, "
        "same run; both from medians (per-step times; matmul timings taken before and after the steps).", "",
        "MFU (conservative) divides by the best matmul timing instead of the median: a lower bound when "
        "other jobs share the cores.", "",
        "| preset | params | batch x seq | device | precision | tokens/s | model GFLOP/s "
        "| matmul GFLOP/s (median / best) | MFU | MFU (conservative) | target | peak memory MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["presets"]:
        target = r.get("target")
        verdict = "" if target is None else f"{target:.2f} ({'met' if r['mfu'] >= target else 'not met'})"
        lines.append(f"| {r['preset']} | {r['params'] / 1e6:.2f}M | {r['batch_size']} x {r['seq_len']} | {r['device']} "
                     f"| {r['precision']}{' +compile' if r['compile'] else ''} | {r['tokens_per_s']:,.0f} "
                     f"| {r['model_flops_per_s'] / 1e9:,.1f} | {r['matmul_flops_per_s'] / 1e9:,.1f} / "
                     f"{r['matmul_flops_per_s_best'] / 1e9:,.1f} | {r['mfu']:.3f} | {r['mfu_vs_best_matmul']:.3f} "
                     f"| {verdict} | {r['peak_memory_mib']:,.0f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", action="append", help="model preset(s) (default: tiny and cpu-small on CPU)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--precision", default="auto", help="auto (fp32 CPU / bf16 CUDA), fp32, bf16")
    parser.add_argument("--compile", choices=("no", "yes", "both"), default=None,
                        help="torch.compile the model (default: no on CPU, both eager and compiled on CUDA)")
    parser.add_argument("--batch-size", type=int, help="sequences per step (default: per preset)")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-steps per step")
    parser.add_argument("--seq-len", type=int, help="sequence length (default: the preset's context)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20 CPU, 30 CUDA)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3, 10 with compile)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads (default: all cores)")
    parser.add_argument("--matmul-n", type=int, default=None, help="square matmul size (default 2048 CPU, 8192 CUDA)")
    parser.add_argument("--data", help="prepared data directory instead of synthetic tokens")
    parser.add_argument("--results", type=Path, default=RESULTS, help="directory for the .json / .md results")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    args.steps = args.steps or (30 if cuda else 20)
    args.compile = args.compile or ("both" if cuda else "no")
    args.warmup = args.warmup if args.warmup is not None else (10 if args.compile != "no" else 3)
    args.matmul_n = args.matmul_n or (8192 if cuda else 2048)

    if args.child:
        args.preset = args.preset[0]
        args.compile = args.compile == "yes"
        print(json.dumps(run_child(args)))
        return 0

    import torch

    presets = args.preset or (["expert-335m"] if cuda else ["tiny", "cpu-small"])
    result = {"machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
              "torch": torch.__version__, "loadavg_before": [round(x, 2) for x in os.getloadavg()], "presets": []}
    if cuda and torch.cuda.is_available():
        result["gpu"] = torch.cuda.get_device_name(0)
    modes = {"no": ["no"], "yes": ["yes"], "both": ["no", "yes"]}[args.compile]
    for name, mode in [(name, mode) for name in presets for mode in modes]:
        cmd = [sys.executable, __file__, "--child", "--preset", name, "--device", args.device, "--precision",
               args.precision, "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads",
               str(args.threads), "--matmul-n", str(args.matmul_n), "--grad-accum", str(args.grad_accum),
               "--compile", mode]
        for flag, value in (("--batch-size", args.batch_size), ("--seq-len", args.seq_len), ("--data", args.data)):
            if value:
                cmd += [flag, str(value)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-4000:], file=sys.stderr)
            return 1
        record = json.loads(proc.stdout.strip().splitlines()[-1])
        record["target"] = TARGETS.get(("cuda" if cuda else "cpu", name))
        result["presets"].append(record)
        print(f"{name:12s} {'compiled' if record['compile'] else 'eager':8s} {record['tokens_per_s']:10,.0f} tok/s  "
              f"MFU {record['mfu']:.3f} (conservative {record['mfu_vs_best_matmul']:.3f})  "
              f"({record['model_flops_per_s'] / 1e9:.1f} / {record['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s)  "
              f"peak {record['peak_memory_mib']:,.0f} MiB")
    result["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]

    stem = "train_throughput_cuda" if cuda else "train_throughput"
    write_results(args.results, stem, result, to_markdown(result), show=False)
    print(f"wrote {args.results / stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
