"""The GPU path in one prepared run: CUDA tests, bf16 training MFU (torch.compile), router scoring, a short run.

Meant for one call on a lent H200 (under 8 minutes; `benchmarks/gpu_check.sh` is the command to give the
device tool), and runnable on a CPU with `--smoke` (tiny sizes: the same steps, checked by a test):

    bash benchmarks/gpu_check.sh                       # on the GPU machine: results in $OUT
    python benchmarks/gpu_check.py --smoke --out DIR   # here: every step on the CPU, in about a minute

Steps, each timed, each recorded even when it fails (a failed step does not stop the others):
1. environment: GPU name, memory, driver, torch and CUDA versions;
2. `pytest tests/test_train_cuda.py` (bf16 autocast, CUDA RNG in checkpoints, torch.compile);
3. training MFU in bf16 against the bf16 matmul rate measured in the same run, eager and compiled, for the
   paper's 335M expert and 4.4M router at the paper's sequence length 1024 (target: >= 0.40 for the expert);
4. batched router scoring throughput (E = 4, 8, 16 routers of 4.4M at M = 256);
5. a short end-to-end `smalltalk run` on the GPU (`tiny` preset on the carried corpus subset).
Writes gpu_check.json and gpu_check.md (plus each benchmark's own files) into --out.

The sample corpus does not travel to the GPU machine: `--make-corpus DIR` writes a small subset of it
(the first 200 KB of each file) for step 5; carry that folder (`.device/corpus`, git-ignored).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MFU_TARGET = 0.40
SMOKE_RUN = {"preset": "tiny", "name": "gpu-check-smoke", "num_experts": 2, "prefix_len": 16, "valid_seqs": 64,
             "data": {"max_bytes_per_file": 30_000, "num_workers": 1},
             "routers": {"iterations": 2, "steps_per_iteration": 4, "batch_size": 8, "heldout_seqs": 16},
             "expert_train": {"max_steps": 6, "batch_size": 4, "warmup_steps": 2, "eval_every": 3, "eval_batches": 1,
                              "checkpoint_every": 3},
             "eval": {"max_seqs": 32, "prefix_lens": [8]}}


def make_corpus(src: Path, dst: Path, max_bytes: int = 200_000) -> Path:
    """The first `max_bytes` of each <split>/<domain>.jsonl.gz of the sample corpus, same layout."""
    for path in sorted(src.glob("*/*.jsonl.gz")):
        out = dst / path.parent.name / path.name
        out.parent.mkdir(parents=True, exist_ok=True)
        size = 0
        with gzip.open(path, "rt", encoding="utf-8") as f, gzip.open(out, "wt", encoding="utf-8") as g:
            for line in f:
                g.write(line)
                size += len(line)
                if size >= max_bytes:
                    break
    return dst


def step(name: str, cmd: list[str], out: Path, timeout: int, env: dict | None = None) -> dict:
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                              env={**os.environ, **(env or {})})
        status, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired as e:
        status, tail = "timeout", str(e)[-3000:]
    (out / f"{name}.log").write_text(tail)
    record = {"step": name, "status": status, "seconds": round(time.perf_counter() - start, 1),
              "command": " ".join(cmd)}
    print(f"[{name}] status {status} in {record['seconds']} s", flush=True)
    return record


def environment() -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cuda_available": torch.cuda.is_available(), "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   multiprocessors=props.multi_processor_count)
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            env["driver"] = None
    return env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_check_out")))
    ap.add_argument("--smoke", action="store_true", help="every step on the CPU with tiny sizes (for tests)")
    ap.add_argument("--corpus", type=Path, default=REPO / ".device" / "corpus",
                    help="corpus for the end-to-end run (default .device/corpus)")
    ap.add_argument("--make-corpus", type=Path, metavar="DIR", help="write the corpus subset to DIR and exit")
    args = ap.parse_args(argv)
    if args.make_corpus:
        from smalltalk.paths import default_corpus_dir

        print(make_corpus(default_corpus_dir(), args.make_corpus))
        return 0
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    device = "cpu" if args.smoke else "cuda"
    env = {"PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "SMALLTALK_CORPUS": str(args.corpus)}
    report = {"benchmark": "gpu_check", "smoke": args.smoke, "environment": environment(), "steps": []}
    steps = report["steps"]
    steps.append(step("cuda_tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_train_cuda.py"],
                      out, 300, env))
    if args.smoke:
        mfu = [py, "benchmarks/train_throughput.py", "--device", "cpu", "--preset", "tiny", "--steps", "2",
               "--warmup", "1", "--matmul-n", "256", "--compile", "no", "--results", str(out)]
        scoring = [py, "benchmarks/routing_scoring.py", "--device", "cpu", "--experts", "2", "--presets", "tiny",
                   "--prefix-len", "32", "--seqs", "8", "--repeats", "1", "--results", str(out)]
    else:
        mfu = [py, "benchmarks/train_throughput.py", "--device", "cuda", "--preset", "expert-335m", "--preset",
               "router-4.4m", "--seq-len", "1024", "--compile", "both", "--results", str(out)]
        scoring = [py, "benchmarks/routing_scoring.py", "--device", "cuda", "--experts", "4,8,16", "--presets",
                   "router-4.4m", "--prefix-len", "256", "--results", str(out)]
    steps.append(step("train_mfu", mfu, out, 420, env))
    steps.append(step("router_scoring", scoring, out, 180, env))
    run_cfg = out / "run_config.json"
    run_cfg.write_text(json.dumps(SMOKE_RUN if args.smoke else {"preset": "tiny", "name": "gpu-check"}))
    steps.append(step("end_to_end_run", [py, "-m", "smalltalk", "run", "--config", str(run_cfg), "--out",
                                         str(out / "run"), "--device", device, "--no-progress"], out, 420, env))
    stem = "train_throughput_cuda" if not args.smoke else "train_throughput"
    if (out / f"{stem}.json").is_file():
        report["train_mfu"] = [{k: r.get(k) for k in ("preset", "compile", "tokens_per_s", "mfu", "peak_memory_mib")}
                               for r in json.loads((out / f"{stem}.json").read_text())["presets"]]
    if (out / "run" / "results.json").is_file():
        ev = json.loads((out / "run" / "results.json").read_text())["eval"]
        report["run"] = {"mixture_ppl": ev["mixture"]["ppl"], "dense_ppl": ev["dense"]["ppl"],
                         "improvement_pct": ev["improvement_pct"]}
    expert = [r for r in report.get("train_mfu", []) if r["preset"] == "expert-335m" and r["compile"]]
    report["mfu_target"] = {"target": MFU_TARGET, "expert_335m_compiled": expert[0]["mfu"] if expert else None}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    lines = ["# GPU check", "", f"Environment: `{json.dumps(report['environment'])}`", "",
             "| step | status | seconds |", "|---|---|---|"]
    lines += [f"| {s['step']} | {s['status']} | {s['seconds']} |" for s in steps]
    if report.get("train_mfu"):
        lines += ["", "| preset | compiled | tokens/s | MFU | peak MiB |", "|---|---|---|---|---|"]
        lines += [f"| {r['preset']} | {r['compile']} | {r['tokens_per_s']:,.0f} | {r['mfu']:.3f} | "
                  f"{r['peak_memory_mib']:,.0f} |" for r in report["train_mfu"]]
    if report.get("run"):
        r = report["run"]
        lines += ["", f"End-to-end run: mixture {r['mixture_ppl']:.2f} vs dense {r['dense_ppl']:.2f} "
                      f"({r['improvement_pct']:+.2f}%)"]
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(s["status"] == 0 for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
