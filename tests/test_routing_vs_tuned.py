"""routing_vs_tuned.py: the routing analyses' mixtures against another dense model, on a real finished tiny run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from analysis_run import EVAL_SEQS, build_tiny_run
from smalltalk.analysis.prefix_length import analyze_prefix_length
from smalltalk.analysis.runs import PrefixSettings, ScoreSettings
from smalltalk.analysis.specialisation import analyze_specialisation
from smalltalk.run.layout import RunLayout

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def analysed(tmp_path_factory, corpus_dir):
    run = build_tiny_run(tmp_path_factory, corpus_dir)
    report = {"analyses": {
        "prefix-length": analyze_prefix_length(run, PrefixSettings(prefix_lens=[8, 32], max_seqs=EVAL_SEQS,
                                                                   device="cpu")),
        "specialisation": analyze_specialisation(run, ScoreSettings(max_seqs=EVAL_SEQS, device="cpu"))}}
    path = tmp_path_factory.mktemp("report") / "routing_analyses.json"
    path.write_text(json.dumps(report))
    return run, path, report


def _rebaseline(run: Path, report: Path, dense: Path, results: Path):
    return subprocess.run([sys.executable, "benchmarks/routing_vs_tuned.py", "--report", str(report), "--base-run",
                           str(run), "--dense-model", str(dense), "--results", str(results)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)


def test_the_runs_own_dense_reproduces_every_protocol_number(analysed, tmp_path):
    run, path, report = analysed
    done = _rebaseline(run, path, RunLayout(run).dense_model, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads((tmp_path / "routing_analyses_vs_tuned.json").read_text())
    assert out["num_seqs"] == EVAL_SEQS and len(out["rows"]) == 2
    assert out["tuned_dense_ppl"] == pytest.approx(report["analyses"]["prefix-length"]["curves"][0]["dense_ppl"],
                                                   rel=1e-6)
    for row in out["rows"]:
        assert row["tuned_vs_pct"] == pytest.approx(row["protocol_vs_pct"], abs=1e-6)
    for e in out["experts"]:
        assert e["tuned_dense_ppl"] == pytest.approx(e["protocol_dense_ppl"], rel=1e-6)
    assert "vs tuned dense" in (tmp_path / "routing_analyses_vs_tuned.md").read_text()


def test_another_dense_is_scored_on_the_same_routed_segments(analysed, tmp_path):
    """Expert 0's own weights as "the dense model": on expert 0's segment it ties the mixture exactly."""
    run, path, _ = analysed
    done = _rebaseline(run, path, RunLayout(run).expert_model(0), tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads((tmp_path / "routing_analyses_vs_tuned.json").read_text())
    seg0 = out["experts"][0]
    assert seg0["test_share"] > 0 and seg0["tuned_vs_pct"] == pytest.approx(0.0, abs=1e-6)
    assert seg0["tuned_dense_ppl"] != pytest.approx(seg0["protocol_dense_ppl"], rel=1e-3)


def test_a_run_whose_routers_differ_is_refused(analysed, tmp_path):
    run, path, report = analysed
    shares = report["analyses"]["specialisation"]["experts"]
    moved = json.loads(json.dumps(report))
    moved["analyses"]["specialisation"]["experts"][0]["test_share"] = shares[0]["test_share"] + 2 / EVAL_SEQS
    bad = tmp_path / "other.json"
    bad.write_text(json.dumps(moved))
    done = _rebaseline(run, bad, RunLayout(run).dense_model, tmp_path)
    assert done.returncode == 2 and "shares" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "routing_analyses_vs_tuned.json").exists()
