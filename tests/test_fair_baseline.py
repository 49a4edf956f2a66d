"""The tuned-baseline benchmark: both sides swept at equal tokens, selected on validation, compared on test."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from smalltalk.io import read_json
from test_pipeline import sharded_run  # noqa: F401  (module fixture reused)

REPO = Path(__file__).resolve().parents[1]


def test_the_sweep_trains_equal_token_points_and_tests_the_best_pair(sharded_run, tmp_path):
    cmd = [sys.executable, "benchmarks/fair_baseline.py", "--base-run", str(sharded_run), "--out", str(tmp_path / "out"),
           "--results", str(tmp_path), "--name", "t", "--dense-batches", "8,4", "--expert-batches", "4,2",
           "--lrs", "0.01,0.02", "--threads", "1"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "fair_baseline_t.json").read_text())
    points = report["points"]
    assert len(points) == report["points_planned"] == 8
    # Every point sees the protocol's tokens: 2 experts x 4 x 8 sequences.
    for p in points:
        per_step = p["batch_size"] * (2 if p["side"] == "mixture" else 1)
        assert p["max_steps"] * per_step == 2 * 4 * 8
    for side in ("dense", "mixture"):
        assert report["best"][side] == min((p for p in points if p["side"] == side), key=lambda p: p["valid_ppl"])
    tuned, protocol = report["test"]["tuned"], report["test"]["protocol"]
    assert protocol["dense"] == "dense_b8_lr0.01" and protocol["mixture"] == "mixture_b4_lr0.01"
    results = read_json(tmp_path / "out" / "test_tuned" / "results.json")
    assert tuned["dense_ppl"] == pytest.approx(results["eval"]["dense"]["ppl"])
    assert tuned["training_flops_ratio"] == pytest.approx(results["costs"]["mixture_training"]
                                                          / results["costs"]["dense_training"])
    protocol_report = (tmp_path / "out" / "test_protocol" / "report.md").read_text()
    assert "the dense baseline 8 steps x batch 8 at lr 0.01 (the paper's protocol" in protocol_report
    # Re-running trains nothing: every point is cached.
    again = subprocess.run(cmd + ["--no-test"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "training FLOPs" not in again.stderr
