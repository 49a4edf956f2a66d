"""App. C benchmark: a variant run with routers trained on a longer prefix, both partitions routed at M-hat = M."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from analysis_run import EVAL_SEQS, build_tiny_run

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, corpus_dir):
    return build_tiny_run(tmp_path_factory, corpus_dir)


def test_app_c_trains_the_long_prefix_partition_and_compares_both_at_the_short_prefix(run_dir, tmp_path):
    variant = tmp_path / "long"
    proc = subprocess.run([sys.executable, "benchmarks/app_c.py", "--base", str(run_dir), "--long-m", "64",
                           "--out", str(variant), "--max-seqs", str(EVAL_SEQS), "--results", str(tmp_path),
                           "--threads", "1"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = tmp_path.glob("app_c_*.json")
    report = json.loads(path.read_text())
    # The variant differs in its routers only: same data and dense baseline, routers trained on 64 tokens.
    assert (variant / "data").resolve() == (run_dir / "data").resolve() and (variant / "dense").is_symlink()
    assert json.loads((variant / "routers" / "manifest.json").read_text())["prefix_len"] == 64
    long_c, short_c = report["curves"]
    assert {32, 64} <= {r["prefix_len"] for r in long_c["rows"]} and {8, 32} <= {r["prefix_len"] for r in short_c["rows"]}
    # The base partition at M-hat = M is the base run's own mixture evaluation (same sequences, another code path).
    base_ppl = json.loads((run_dir / "eval" / "results.json").read_text())["mixture"]["ppl"]
    assert report["at_short_m"]["short"] == pytest.approx(base_ppl, rel=1e-6)
    assert report["at_short_m"]["long"] == next(r["ppl"] for r in long_c["rows"] if r["prefix_len"] == 32)
    assert "| 32 |" in path.with_suffix(".md").read_text()
