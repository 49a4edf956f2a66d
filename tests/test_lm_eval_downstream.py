"""`smalltalk eval-downstream` (mixture vs dense table) and the lm-eval CLI wrapper, end to end offline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from smalltalk.cli import main  # noqa: E402
from smalltalk.evaluation.downstream import compare, resolve_tasks  # noqa: E402
from smalltalk.evaluation.downstream_report import update_report  # noqa: E402
from smalltalk.evaluation.lm_eval_cli import TASKS_DIR, task_paths  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def test_eval_downstream_writes_the_side_by_side_table(tiny_mixture, tmp_path, capsys):
    # A run directory in the `smalltalk run` layout, built from the tiny models.
    run = tmp_path / "run"
    shutil.copytree(tiny_mixture["bundle"], run / "bundle")
    shutil.copytree(tiny_mixture["dense"], run / "dense" / "model")
    (run / "report.md").write_text("# SmallTalk LM run: tiny\n\nperplexity table\n")
    rc = main(["eval-downstream", "--run-dir", str(run), "--tasks", "blimp_adjunct_island,hellaswag,gsm8k",
               "--limit", "4", "--max-gen-toks", "6", "--batch-size", "16", "--device", "cpu"])
    assert rc == 0
    assert "mixture better or equal on" in capsys.readouterr().out
    report = json.loads((run / "eval" / "downstream.json").read_text())
    rows = {r["task"]: r for r in report["comparison"]["rows"]}
    assert list(rows) == ["blimp_offline_adjunct_island", "hellaswag_offline", "gsm8k_offline"]
    for side in ("mixture", "dense"):
        raw = json.loads((run / "eval" / f"lm_eval_{side}.json").read_text())["results"]
        assert rows["blimp_offline_adjunct_island"][side] == raw["blimp_offline_adjunct_island"]["acc,none"]
        assert rows["hellaswag_offline"][side] == raw["hellaswag_offline"]["acc_norm,none"]
        assert rows["gsm8k_offline"][side] == raw["gsm8k_offline"]["exact_match,strict-match"]
    for r in rows.values():
        assert r["n"] == 4
        want = "tie" if round(r["mixture"], 4) == round(r["dense"], 4) else \
            ("mixture" if r["mixture"] > r["dense"] else "dense")
        assert r["winner"] == want
    s = report["comparison"]["summary"]
    assert s["tasks"] == 3 and s["mixture_better"] + s["ties"] + s["dense_better"] == 3
    # Requests per expert: 2 sentences per BLiMP pair, 4 endings per HellaSwag item, 1 prompt per GSM8K item.
    requests = report["comparison"]["routing"]["requests"]
    assert sum(requests["blimp_offline_adjunct_island"].values()) == 8
    assert sum(requests["hellaswag_offline"].values()) == 16
    assert sum(requests["gsm8k_offline"].values()) == 4
    md = (run / "eval" / "downstream.md").read_text()
    assert "| blimp/adjunct_island | acc |" in md and "### Routing: requests per expert" in md
    text = (run / "report.md").read_text()
    assert text.startswith("# SmallTalk LM run: tiny") and md.strip() in text
    assert report["loadavg"] and set(report["seconds"]) == {"mixture", "dense"}


def test_compare_counts_wins_ties_and_blimp_means():
    def side(values):
        return {"results": {t: {"acc,none": v, "acc_stderr,none": 0.01} for t, v in values.items()},
                "group_subtasks": {}, "n_samples": {t: {"effective": 10} for t in values},
                "routing": {t: {0: 3, 1: 1} for t in values}, "model": {"smalltalk": {"num_experts": 2}}}

    mixture = side({"blimp_offline_a": 0.8, "blimp_offline_b": 0.5, "hellaswag_offline": 0.30001})
    dense = side({"blimp_offline_a": 0.7, "blimp_offline_b": 0.6, "hellaswag_offline": 0.30004})
    out = compare({"mixture": mixture, "dense": dense})
    assert [r["winner"] for r in out["rows"]] == ["mixture", "dense", "tie"]
    assert out["summary"] == {"tasks": 3, "mixture_better": 1, "ties": 1, "dense_better": 1,
                              "better_or_equal_rate": pytest.approx(2 / 3)}
    assert out["blimp"]["paradigms"] == 2 and out["blimp"]["mixture_mean"] == pytest.approx(0.65)
    assert out["routing"]["requests"]["blimp (all paradigms)"] == {"0": 6, "1": 2}


def test_task_names_map_to_local_copies_unless_online():
    assert resolve_tasks(["blimp", "hellaswag", "gsm8k", "blimp_wh_island", "arc_easy"]) == \
        ["blimp_offline", "hellaswag_offline", "gsm8k_offline", "blimp_offline_wh_island", "arc_easy"]
    assert resolve_tasks(["blimp", "hellaswag"], online=True) == ["blimp", "hellaswag"]


def test_report_section_is_replaced_not_duplicated(tmp_path):
    report = tmp_path / "report.md"
    report.write_text("# run\n\nbody\n")
    update_report(report, "## Downstream v1\n")
    update_report(report, "## Downstream v2\n")
    text = report.read_text()
    assert text.count("<!-- downstream -->") == 1 and "v2" in text and "v1" not in text
    assert text.startswith("# run\n\nbody\n")


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "blimp_not_a_paradigm", "--limit", "2"], "unknown lm-eval task(s) ['blimp_offline_not_a_paradigm']"),
    (["--limit", "0"], "limit=0 must be a positive integer"),
    (["--batch-size", "0"], "batch_size=0"),
])
def test_eval_downstream_bad_input_exits_2(tiny_mixture, tmp_path, capsys, argv, message):
    rc = main(["eval-downstream", "--dense", str(tiny_mixture["dense"]), "--out", str(tmp_path), *argv])
    assert rc == 2
    assert message in capsys.readouterr().err


def test_eval_downstream_missing_inputs_exit_2(tmp_path, capsys):
    assert main(["eval-downstream", "--bundle", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    assert "directory not found" in capsys.readouterr().err
    assert main(["eval-downstream", "--out", str(tmp_path)]) == 2
    assert "needs --run-dir, or --bundle and/or --dense" in capsys.readouterr().err
    assert main(["eval-downstream", "--dense", str(tmp_path)]) == 2
    assert "give --out DIR" in capsys.readouterr().err


def test_task_paths_split_the_include_path_and_add_ours_once(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert task_paths(None) == [TASKS_DIR]
    assert task_paths(f"{a}{os.pathsep}{b}") == [a, b, TASKS_DIR]
    assert task_paths([str(a), str(TASKS_DIR)]) == [a, TASKS_DIR]


def test_user_task_folder_and_our_offline_tasks_resolve_together(tiny_mixture, tmp_path):
    """The README's own-task example, through the wrapper: a task YAML in another folder (--include_path) and
    one of our *_offline tasks in the same call, both found and run."""
    cmd = [sys.executable, "-m", "smalltalk.evaluation.lm_eval_cli", "--model", "smalltalk", "--model_args",
           f"bundle={tiny_mixture['bundle']}", "--tasks", "capitals,blimp_offline_wh_island",
           "--include_path", "recipes/lm_eval_task", "--limit", "4", "--device", "cpu",
           "--output_path", str(tmp_path / "out")]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (results,) = list((tmp_path / "out").rglob("results_*.json"))
    data = json.loads(results.read_text())
    assert data["n-samples"]["capitals"]["effective"] == 4
    assert data["n-samples"]["blimp_offline_wh_island"]["effective"] == 4


def test_lm_eval_cli_runs_the_smalltalk_model(tiny_mixture, tmp_path):
    """`python -m smalltalk.evaluation.lm_eval_cli --model smalltalk ...`: lm-eval's own CLI, offline."""
    cmd = [sys.executable, "-m", "smalltalk.evaluation.lm_eval_cli", "--model", "smalltalk",
           "--model_args", f"bundle={tiny_mixture['bundle']},prefix_len=16", "--tasks", "blimp_offline_wh_island",
           "--limit", "3", "--device", "cpu", "--batch_size", "8", "--output_path", str(tmp_path / "out")]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "blimp_offline_wh_island" in proc.stdout
    (results,) = list((tmp_path / "out").rglob("results_*.json"))
    data = json.loads(results.read_text())
    assert data["n-samples"]["blimp_offline_wh_island"]["effective"] == 3
    assert data["config"]["model"] == "smalltalk"
    assert data["config"]["smalltalk"]["prefix_len"] == 16


def test_eval_downstream_takes_a_task_yaml_and_prints_routing(tiny_mixture, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # the example task's data_files path is relative to the repository root
    argv = ["eval-downstream", "--bundle", str(tiny_mixture["bundle"]), "--dense", str(tiny_mixture["dense"]),
            "--tasks", "recipes/lm_eval_task/capitals.yaml", "--limit", "3", "--device", "cpu",
            "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "requests routed, capitals: expert" in out
    report = json.loads((tmp_path / "out" / "downstream.json").read_text())
    assert report["lm_eval_tasks"] == ["capitals"]
    assert main(["eval-downstream", "--bundle", str(tiny_mixture["bundle"]), "--tasks", "nope.yaml",
                 "--out", str(tmp_path)]) == 2
    assert "--tasks nope.yaml: task file not found" in capsys.readouterr().err


def test_downstream_benchmark_writes_named_results_and_leaves_the_run_untouched(tiny_mixture, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_mixture["bundle"], run / "bundle")
    shutil.copytree(tiny_mixture["dense"], run / "dense" / "model")
    proc = subprocess.run([sys.executable, "benchmarks/downstream.py", "--run-dir", str(run), "--tasks", "hellaswag",
                           "--limit", "4", "--out", str(tmp_path / "lm_eval"), "--results", str(tmp_path / "results"),
                           "--name", "downstream_tiny", "--device", "cpu", "--threads", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "results" / "downstream_tiny.json").read_text())
    (row,) = result["rows"]
    raw = json.loads((tmp_path / "lm_eval" / "lm_eval_mixture.json").read_text())["results"]
    assert row["task"] == "hellaswag_offline" and row["n"] == 4
    assert row["mixture"] == raw["hellaswag_offline"]["acc_norm,none"]
    md = (tmp_path / "results" / "downstream_tiny.md").read_text()
    assert "--name downstream_tiny" in md and "hellaswag" in md
    assert not (run / "eval").exists()  # --out keeps lm-eval's files out of the run directory


def test_eval_downstream_resumes_finished_sides_and_redoes_changed_ones(tiny_mixture, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_mixture["bundle"], run / "bundle")
    shutil.copytree(tiny_mixture["dense"], run / "dense" / "model")
    argv = ["eval-downstream", "--run-dir", str(run), "--tasks", "blimp_adjunct_island,gsm8k", "--limit", "3",
            "--max-gen-toks", "4", "--batch-size", "8", "--device", "cpu"]

    def downstream(*extra):
        assert main(argv + list(extra)) == 0
        err = capsys.readouterr().err
        report = json.loads((run / "eval" / "downstream.json").read_text())
        return report, {side for side in ("mixture", "dense") if f"{side}: reusing" in err}

    first, reused = downstream()
    assert reused == set() and first["reused"] == []
    # Both sides finished: a re-run evaluates nothing and reports the same rows.
    again, reused = downstream()
    assert reused == {"mixture", "dense"} == set(again["reused"])
    assert again["comparison"]["rows"] == first["comparison"]["rows"]
    # A job cut off during the dense side left only the mixture's results: only dense is evaluated.
    (run / "eval" / "lm_eval_dense.json").unlink()
    resumed, reused = downstream()
    assert reused == {"mixture"} and resumed["comparison"]["rows"] == first["comparison"]["rows"]
    # A retrained model (its weights rewritten) or other settings are evaluated again.
    weights = next(p for p in (run / "dense" / "model").iterdir() if p.suffix == ".safetensors")
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    _, reused = downstream()
    assert reused == {"mixture"}
    _, reused = downstream("--limit", "2")
    assert reused == set()
    fresh, reused = downstream("--fresh")
    assert reused == set() and fresh["comparison"]["rows"] == first["comparison"]["rows"]
