"""The tuned trade-off: dense models of other widths tuned at a map point's tokens (tuned_widths.py), and the tuned
mixtures set against that width curve on both FLOP axes (tradeoff_tuned.py), on a small real run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from smalltalk.run.layout import RunLayout
from test_pipeline import sharded_run  # noqa: F401  (module fixture reused)

REPO = Path(__file__).resolve().parents[1]


def _bench(name: str, *args: str):
    return subprocess.run([sys.executable, f"benchmarks/{name}.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=900)


@pytest.fixture(scope="module")
def widths(sharded_run, tmp_path_factory):
    """A one-budget map point and dense models 40 wide tuned on two learning rates at its tokens."""
    root = tmp_path_factory.mktemp("tuned-tradeoff")
    results = root / "results"
    point = _bench("map", "--base-run", str(sharded_run), "--out", str(root / "map"), "--size", "42k",
                   "--budgets", "0.5", "--dense-batches", "8", "--mixture-batches", "4", "--lrs", "0.01",
                   "--valid-seqs", "32", "--test-seqs", "32", "--threads", "1", "--results", str(results),
                   "--name", "point")
    assert point.returncode == 0, point.stderr[-3000:]
    cmd = ["--map-report", str(results / "point.json"), "--widths", "40", "--lrs", "0.01,0.02", "--out",
           str(root / "widths"), "--results", str(results)]
    done = _bench("tuned_widths", *cmd)
    assert done.returncode == 0, done.stderr[-3000:]
    return sharded_run, root, results, cmd


def test_each_width_is_tuned_on_validation_and_scored_on_the_map_points_test_sequences(widths):
    from smalltalk.data.splits import evenly_spaced, load_split
    from smalltalk.model.flops import inference_flops, training_flops
    from smalltalk.model.io import load_model_dir
    from smalltalk.train.evaluate import evaluate

    base, root, results, cmd = widths
    point = json.loads((results / "point.json").read_text())
    report = json.loads((results / "tuned_widths_point.json").read_text())
    own, wide = report["widths"]
    # The first row is the map point's own tuned dense, untouched; the wider one was swept on its own grid.
    assert own["hidden_size"] == 32 and own["test_ppl"] == point["budgets"][0]["dense_ppl"]
    assert wide["hidden_size"] == 40 and [(p["batch_size"], p["lr"]) for p in wide["points"]] == [(8, 0.01), (8, 0.02)]
    best = min(wide["points"], key=lambda p: p["valid_ppl"])
    assert wide["best"] == f"dense_b8_lr{best['lr']:g}"
    model_dir = root / "widths" / "h40" / "budgets" / "0" / wide["best"] / "dense" / "model"
    model, _ = load_model_dir(model_dir)
    assert model.config.hidden_size == 40 and wide["params"] == model.num_params() > own["params"]
    test = load_split(RunLayout(base).data, "test").dataset
    assert wide["test_ppl"] == pytest.approx(evaluate(model, test, evenly_spaced(len(test), 32), batch_size=32).ppl)
    # The same tokens as the map point: the FLOPs are the formula's at its sequences.
    S = model.config.max_seq_len
    assert best["steps"] * 8 == point["budgets"][0]["total_seqs"] == report["total_seqs"]
    assert wide["training_flops"] == training_flops(model.config, best["steps"], 8, S - 1)
    assert wide["inference_flops"] == inference_flops(model.config, S)
    # A re-run trains nothing: every line and its score resume from OUT.
    again = _bench("tuned_widths", *cmd)
    assert again.returncode == 0 and "stable to step" not in again.stderr and "done (" not in again.stderr
    assert json.loads((results / "tuned_widths_point.json").read_text())["widths"] == report["widths"]
    same = _bench("tuned_widths", *cmd[:2], "--widths", "32", "--out", str(root / "x"), "--results", str(root / "x"))
    assert same.returncode == 2 and "--widths 32" in same.stderr and not (root / "x").exists()


def test_tuned_mixtures_are_set_against_the_width_curve_with_the_routers_counted(widths, tmp_path):
    from smalltalk.model.flops import training_flops
    from smalltalk.model.io import load_model_dir
    from smalltalk.run.layout import read_run_config
    from smalltalk.run.pipeline import run_costs_of

    base, root, results, _ = widths
    routers = run_costs_of(RunLayout(base), read_run_config(base))
    protocol = tmp_path / "protocol.json"
    protocol.write_text(json.dumps({"runs": [{"num_experts": 2, "costs": routers.to_dict()}]}))
    args = ["--widths-report", str(results / "tuned_widths_point.json"), "--mixtures", str(results / "point.json"),
            "--protocol-results", str(protocol), "--results", str(tmp_path)]
    done = _bench("tradeoff_tuned", *args)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "tradeoff_tuned.json").read_text())
    (mix,) = [p for p in report["points"] if p["kind"] == "mixture"]
    point = json.loads((results / "point.json").read_text())["budgets"][0]
    assert mix["test_ppl"] == point["mixture_ppl"] and mix["num_experts"] == 2
    expert, _ = load_model_dir(root / "map" / "budgets" / "0" / point["lines"]["mixture"] / "expert_0" / "model")
    steps = point["best_valid"]["mixture"]["steps"]
    experts = 2 * training_flops(expert.config, steps, 4, expert.config.max_seq_len - 1)
    assert mix["training_flops"] == experts + routers.mixture_training - routers.experts_training
    # The map point is the width curve's own: its dense model is not counted twice.
    assert [p["hidden_size"] for p in report["points"] if p.get("width_curve")] == [32, 40]
    assert len([p for p in report["points"] if p["kind"] == "dense"]) == 2
    (m,) = report["matches"]
    beaten = [p["test_ppl"] for p in report["points"] if p["kind"] == "dense" and p["test_ppl"] >= mix["test_ppl"]]
    assert m["dense_ppl"] == (min(beaten) if beaten else None)
    assert (tmp_path / "tradeoff_tuned.png").stat().st_size > 0
    assert "tuned dense, hidden 40" in (tmp_path / "tradeoff_tuned.md").read_text()
    twice = _bench("tradeoff_tuned", *args[:4], str(results / "point.json"), *args[4:])
    assert twice.returncode == 2 and "same number of experts" in twice.stderr
