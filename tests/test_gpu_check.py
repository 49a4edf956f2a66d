"""`benchmarks/gpu_check.sh`, the one prepared GPU script, runs every step on the CPU in smoke mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from gpu_check import make_corpus  # noqa: E402


@pytest.mark.slow
def test_gpu_check_script_runs_every_step_in_smoke_mode(corpus_dir, tmp_path):
    corpus = make_corpus(corpus_dir, tmp_path / "corpus", max_bytes=60_000)
    assert sorted(p.name for p in (corpus / "train").iterdir()) == sorted(p.name for p in (corpus_dir / "train").iterdir())
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--smoke", "--corpus", str(corpus)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert [s["step"] for s in report["steps"]] == ["cuda_tests", "train_mfu", "router_scoring", "end_to_end_run"]
    assert all(s["status"] == 0 for s in report["steps"])
    assert report["train_mfu"][0]["tokens_per_s"] > 0 and "mixture_ppl" in report["run"]
    assert (out / "gpu_check.md").is_file() and (out / "nvidia-smi.txt").is_file()
