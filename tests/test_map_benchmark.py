"""The map benchmark (WSD lines, a decay per budget, split points) and its fit, on a small real run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmark_import import import_benchmark
from smalltalk.model.io import sha256_file
from smalltalk.run.layout import RunLayout
from test_pipeline import sharded_run  # noqa: F401  (module fixture reused)

REPO = Path(__file__).resolve().parents[1]
ARGS = ["--size", "42k", "--budgets", "0.2,0.5,1,2", "--batches", "4,8", "--lrs", "0.01", "--split-fractions", "0.5",
        "--valid-seqs", "64", "--test-seqs", "64", "--threads", "1"]


def _map(base: Path, out: Path, results: Path, *extra: str):
    return subprocess.run([sys.executable, "benchmarks/map.py", "--base-run", str(base), "--out", str(out),
                           "--results", str(results), *ARGS, *extra], cwd=REPO, capture_output=True, text=True,
                          timeout=900)


@pytest.fixture(scope="module")
def mapped(sharded_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("map")
    done = _map(sharded_run, root / "out", root / "results")
    assert done.returncode == 0, done.stderr[-3000:]
    return sharded_run, root


def test_each_budget_is_the_line_plus_its_own_decay(mapped):
    """A budget's model equals a standalone WSD run of that budget, bit for bit: the line shares its stable phase."""
    from smalltalk.data.splits import load_split
    from smalltalk.train.trainer import Trainer

    base, root = mapped
    bench = import_benchmark("map")
    plan = bench.make_plan(base, "42k", [0.2, 0.5, 1.0, 2.0], [4, 8], 2, 0.2, [0.5], 0)
    line = bench.Line("dense", 8, 0.01)
    cfg = plan.train_config(line, 1, plan.seed, "standalone")
    alone = Trainer(plan.model, cfg, load_split(RunLayout(base).data, "train"), root / "standalone", progress=False)
    alone.train()
    mapped_model = root / "out" / "budgets" / "1" / line.name / "dense" / "model" / "model.safetensors"
    assert sha256_file(root / "standalone" / "model" / "model.safetensors") == sha256_file(mapped_model)


def test_the_report_selects_on_validation_and_scores_the_test_split(mapped):
    from smalltalk.data.splits import load_split
    from smalltalk.model.io import load_model_dir
    from smalltalk.train.evaluate import evaluate

    base, root = mapped
    report = json.loads((root / "results" / "map_42k_e2.json").read_text())
    assert [b["budget"] for b in report["budgets"]] == [0, 1, 2, 3] and len(report["points"]) == 4 * 4
    tpp = [b["tokens_per_param"] for b in report["budgets"]]
    assert tpp == sorted(tpp) and report["num_experts"] == 2
    for b in report["budgets"]:
        here = [p for p in report["points"] if p["budget"] == b["budget"]]
        for side in ("dense", "mixture"):
            best = min((p for p in here if p["side"] == side), key=lambda p: p["valid_ppl"])
            assert b["lines"][side] == f"{side}_b{best['batch_size']}_lr{best['lr']:g}"
        assert b["improvement_pct"] == pytest.approx(100 * (1 - b["mixture_ppl"] / b["dense_ppl"]))
        assert [s["fraction"] for s in b["split"]] == [0.5] and b["split"][0]["mixture_ppl"] > 1
    # The dense test ppl is the chosen model's own, scored again here on the same test subset.
    b = report["budgets"][2]
    idx = np.load(root / "out" / "test_routes.npy")[0]
    model, _ = load_model_dir(root / "out" / "budgets" / "2" / b["lines"]["dense"] / "dense" / "model")
    assert evaluate(model, load_split(RunLayout(base).data, "test").dataset, idx).ppl == pytest.approx(b["dense_ppl"])


def test_a_rerun_resumes_without_training_and_the_fit_writes_law_plot_and_holdout(mapped):
    base, root = mapped
    again = _map(base, root / "out", root / "results")
    assert again.returncode == 0 and "stable to step" not in again.stderr and "done (" not in again.stderr
    law_out = root / "law.json"
    fit = subprocess.run([sys.executable, "benchmarks/map_fit.py", "--results", str(root / "results"),
                          "--law-out", str(law_out), "--holdout", "map_42k_e2:2"], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert fit.returncode == 0, fit.stderr[-3000:]
    law = json.loads(law_out.read_text())
    assert law["held_out"] == "map_42k_e2:2" and "map_42k_e2:2" not in law["law"]["fitted_on"]
    summary = json.loads((root / "results" / "map.json").read_text())
    h = summary["holdout"]
    assert h["measured"]["dense_ppl"] == summary["rows"][2]["dense_ppl"] and set(h["error_pct"]) == {"dense_ppl",
                                                                                                     "mixture_ppl"}
    assert (root / "results" / "map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "crossover" in (root / "results" / "map.md").read_text()


def test_a_process_planned_differently_is_refused_on_a_shared_out(mapped):
    # Without --split-fractions the budgets round to another multiple: a per-lr process started so would train lines
    # a merge then compares at unequal tokens. It is refused before it trains or writes anything.
    base, root = mapped
    bench = import_benchmark("map")
    with_split = bench.make_plan(base, "42k", [0.2, 0.5, 1.0, 2.0], [4, 8], 2, 0.2, [0.5], 0)
    without = bench.make_plan(base, "42k", [0.2, 0.5, 1.0, 2.0], [4, 8], 2, 0.2, [], 0)
    assert with_split.total_seqs != without.total_seqs
    before = sorted(str(q) for q in (root / "out").rglob("*")) + sorted(str(q) for q in (root / "results").rglob("*"))
    other = _map(base, root / "out", root / "other-results", "--split-fractions", "", "--lrs", "0.02")
    assert other.returncode == 2, other.stderr[-2000:]
    assert "plan.json: --out was planned differently (total_seqs" in other.stderr and "Traceback" not in other.stderr
    assert len(other.stderr.strip().splitlines()) == 1
    after = sorted(str(q) for q in (root / "out").rglob("*")) + sorted(str(q) for q in (root / "results").rglob("*"))
    assert after == before and not (root / "other-results").exists()


def test_a_map_predicted_before_it_runs_is_compared_with_the_law_it_was_predicted_from(mapped, tmp_path):
    """--predict writes the shipped law's numbers for a map not measured yet; once measured, the fit compares them at
    the measured tokens with that law (not the refitted one). A measured map cannot be 'predicted'."""
    _, root = mapped
    measured = json.loads((root / "results" / "map_42k_e2.json").read_text())
    results = tmp_path / "results"
    results.mkdir()
    (results / "map_42k_first.json").write_text(json.dumps(measured))  # gives the size's parameter count
    law_out = tmp_path / "law.json"
    cmd = [sys.executable, "benchmarks/map_fit.py", "--results", str(results), "--law-out", str(law_out)]
    assert subprocess.run(cmd, cwd=REPO, capture_output=True, timeout=300).returncode == 0
    shipped = json.loads(law_out.read_text())["law"]
    pred = subprocess.run([*cmd, "--predict", "map_42k_e2:2:0.2,2", "--note", "before"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert pred.returncode == 0, pred.stderr[-2000:]
    written = json.loads((results / "prediction_map_42k_e2.json").read_text())
    assert written["law"] == shipped and [p["tokens_per_param"] for p in written["predicted"]] == [0.2, 2.0]
    (results / "map_42k_e2.json").write_text(json.dumps(measured))
    again = subprocess.run([*cmd, "--predict", "map_42k_e2:2:0.2"], cwd=REPO, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 2 and "already measured" in again.stderr
    assert subprocess.run(cmd, cwd=REPO, capture_output=True, timeout=300).returncode == 0
    (compared,) = json.loads((results / "map.json").read_text())["predictions"]
    assert compared["note"] == "before" and len(compared["rows"]) == len(measured["budgets"])
    from smalltalk.plan.law import Law

    law = Law.from_dict(shipped)
    for row, b in zip(compared["rows"], measured["budgets"]):
        assert row["measured"]["mixture_ppl"] == b["mixture_ppl"]
        assert row["predicted"]["dense_ppl"] == pytest.approx(np.exp(law.dense(measured["params"], b["tokens"])))
    assert "Predicted before it ran: map_42k_e2" in (results / "map.md").read_text()


def test_a_size_not_measured_yet_is_predicted_from_its_parameter_count_with_the_extrapolation_said(mapped, tmp_path):
    """A map of a new size needs --params (no measured map gives it); the prediction records that the law's size
    term was never fitted; --params contradicting a measured map of that size is refused, nothing written."""
    _, root = mapped
    results = tmp_path / "results"
    results.mkdir()
    (results / "map_42k_first.json").write_text((root / "results" / "map_42k_e2.json").read_text())
    law_out = tmp_path / "law.json"
    cmd = [sys.executable, "benchmarks/map_fit.py", "--results", str(results), "--law-out", str(law_out)]
    assert subprocess.run(cmd, cwd=REPO, capture_output=True, timeout=300).returncode == 0
    missing = subprocess.run([*cmd, "--predict", "map_1m_e2:2:1,2"], cwd=REPO, capture_output=True, text=True,
                             timeout=300)
    assert missing.returncode == 2 and "--params" in missing.stderr
    assert not (results / "prediction_map_1m_e2.json").exists()
    done = subprocess.run([*cmd, "--predict", "map_1m_e2:2:1,2", "--params", "1057152"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    pred = json.loads((results / "prediction_map_1m_e2.json").read_text())
    assert pred["params"] == 1057152 and any("size term is not fitted" in why for why in pred["extrapolation"])
    wrong = subprocess.run([*cmd, "--predict", "map_42k_e4:4:1", "--params", "1057152"], cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert wrong.returncode == 2 and "--params 1057152" in wrong.stderr
    assert not (results / "prediction_map_42k_e4.json").exists()


def test_seeds_of_one_budget_gather_into_mean_and_std(mapped, tiny_data, tmp_path):
    """tuned_seeds.py: one map point per seed (each its own routers and shards) -> mean +- std; a multi-budget
    report or a repeated seed is refused with exit 2."""
    import statistics

    from smalltalk.run.pipeline import run_pipeline
    from test_pipeline import fast_config, small_data

    base, root = mapped
    seed = json.loads((base / "run_config.json").read_text())["seed"]
    other = tmp_path / "other-seed"
    small_data(tiny_data, RunLayout(other).data)
    run_pipeline(fast_config(seed=seed + 1), other, until="shard", log=lambda m: None)
    # Each side's own batch (the seeds' grid fixes a batch per side and sweeps the learning rate).
    one = ["--size", "42k", "--budgets", "0.5", "--dense-batches", "8", "--mixture-batches", "4", "--lrs", "0.01",
           "--valid-seqs", "32",
           "--test-seqs", "32", "--threads", "1", "--results", str(tmp_path / "results")]
    reports = []
    for k, run in enumerate([base, other]):
        done = subprocess.run([sys.executable, "benchmarks/map.py", "--base-run", str(run), "--out",
                               str(tmp_path / f"out{k}"), "--name", f"point{k}", *one], cwd=REPO, capture_output=True,
                              text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        reports.append(tmp_path / "results" / f"point{k}.json")
    cmd = [sys.executable, "benchmarks/tuned_seeds.py", "--results", str(tmp_path / "results")]
    ok = subprocess.run([*cmd, *map(str, reports), "--name", "seeds"], cwd=REPO, capture_output=True, text=True,
                        timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    s = json.loads((tmp_path / "results" / "seeds.json").read_text())
    points = [json.loads(p.read_text())["budgets"][0] for p in reports]
    assert [r["seed"] for r in s["rows"]] == [seed, seed + 1]
    assert [(p["side"], p["batch_size"]) for p in json.loads(reports[0].read_text())["points"]] == \
        [("dense", 8), ("mixture", 4)]
    assert s["rows"][0]["grid"]["batches"] == "[8] (dense) / [4] (mixture, per expert)"
    assert s["improvement_pct"]["mean"] == pytest.approx(statistics.mean(p["improvement_pct"] for p in points))
    assert s["dense_ppl"]["std"] == pytest.approx(statistics.stdev(p["dense_ppl"] for p in points))
    assert "mixture vs tuned dense" in (tmp_path / "results" / "seeds.md").read_text()
    many = subprocess.run([*cmd, str(root / "results" / "map_42k_e2.json")], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert many.returncode == 2 and "4 budgets" in many.stderr
    twice = subprocess.run([*cmd, str(reports[0]), str(reports[0])], cwd=REPO, capture_output=True, text=True,
                           timeout=300)
    assert twice.returncode == 2 and "different seed" in twice.stderr
