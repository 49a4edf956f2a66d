"""The Figure 2-style trade-off benchmark: wider dense models trained and scored like the run's, beside mixtures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from analysis_run import build_tiny_run

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, corpus_dir):
    return build_tiny_run(tmp_path_factory, corpus_dir)


def test_tradeoff_trains_scores_and_compares_on_both_flop_axes(run_dir, tmp_path):
    from smalltalk.model.flops import inference_flops, training_flops
    from smalltalk.model.io import load_model_dir
    from smalltalk.train.evaluate import evaluate_model_dir

    proc = subprocess.run([sys.executable, "benchmarks/tradeoff.py", "--run", str(run_dir), "--widths", "24",
                           "--steps", "3", "--max-seqs", "32", "--runs-dir", str(tmp_path / "runs"),
                           "--results", str(tmp_path), "--threads", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "tradeoff.json").read_text())
    (point,) = [p for p in report["points"] if p.get("hidden_size") == 24]
    model_dir = tmp_path / "runs" / "tradeoff-dense-h24" / "model"
    model, _ = load_model_dir(model_dir)
    # The numbers are the model's own: its perplexity scored again here, its FLOPs from the formulas.
    assert point["test_ppl"] == pytest.approx(evaluate_model_dir(model_dir, run_dir / "data", "test", max_seqs=32).ppl)
    S = model.config.max_seq_len
    assert point["params"] == model.num_params() and point["inference_flops"] == inference_flops(model.config, S)
    run = json.loads((tmp_path / "runs" / "tradeoff-dense-h24" / "run.json").read_text())
    assert run["step"] == 3 and point["training_flops"] == run["flops"] == training_flops(
        model.config, 3, run["train"]["batch_size"], S - 1)
    # Each mixture is matched to the lowest-perplexity dense model it beats or equals.
    dense = [p for p in report["points"] if p["kind"] == "dense"]
    for m in report["matches"]:
        beaten = [d for d in dense if m["mixture_ppl"] <= d["test_ppl"]]
        assert m["dense_ppl"] == (min(d["test_ppl"] for d in beaten) if beaten else None)
    # The width curve is the run's own dense baseline (E = 4 settings) and the wider model.
    assert {p["label"] for p in report["points"] if p.get("width_curve")} == {
        "dense, hidden 24", "dense baseline of E = 4 (expert size, 4x the expert batch)"}
    assert (tmp_path / "tradeoff.png").stat().st_size > 0 and "strongest dense model" in (
        tmp_path / "tradeoff.md").read_text()


def test_dense_equivalent_interpolates_log_flops_in_log_perplexity_and_never_extrapolates():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from tradeoff import dense_equivalent

    curve = [{"test_ppl": 40.0, "training_flops": 1e12, "inference_flops": 1e7},
             {"test_ppl": 20.0, "training_flops": 4e12, "inference_flops": 4e7},
             {"test_ppl": 10.0, "training_flops": 16e12, "inference_flops": 1e8}]
    # Halfway in log perplexity between the first two widths is halfway in log FLOPs: the geometric mean.
    eq = dense_equivalent(curve, (40.0 * 20.0) ** 0.5)
    assert eq["training_flops"] == pytest.approx(2e12) and eq["inference_flops"] == pytest.approx(2e7)
    assert dense_equivalent(curve, 10.0)["inference_flops"] == pytest.approx(1e8)
    assert dense_equivalent(curve, 9.9) is None and dense_equivalent(curve, 41.0) is None
