"""The three ways to run the E experts give the same experts (paper Alg. 1 lines 14-16: no communication):
sequentially in one process, as E parallel OS processes on one machine, and as independent jobs on
"separate machines" (copies of the run directory that share nothing, whose expert directories are
copied back before the pipeline finishes)."""

from __future__ import annotations

import shutil

import torch

from smalltalk.cli import main
from smalltalk.io import read_json
from smalltalk.run.experts import expert_done, train_expert
from smalltalk.run.layout import RunLayout
from smalltalk.run.pipeline import run_expert_processes, run_pipeline
from smalltalk.model.io import load_model_dir
from test_pipeline import copy_run, fast_config, sharded_run, small_data  # noqa: F401  (module fixture reused)


def _weights(run, k):
    model, _ = load_model_dir(RunLayout(run).expert(k) / "model")
    return model.state_dict()


def _same(a, b) -> bool:
    # Thread counts may differ between processes: equal up to float reduction order.
    return all(torch.allclose(a[n], b[n], atol=1e-5, rtol=1e-4) for n in a)


def test_sequential_parallel_and_separate_machines_agree(sharded_run, tiny_data, tmp_path, capsys):
    # 1. Sequentially, in this process.
    seq = copy_run(sharded_run, tmp_path / "sequential")
    for k in (0, 1):
        train_expert(seq, k, progress=False, log=lambda m: None)

    # 2. Two OS processes at once on this machine (`smalltalk train-expert --run R --expert k` each).
    par = copy_run(sharded_run, tmp_path / "parallel")
    run_expert_processes(par, [0, 1], workers=2, log=lambda m: None)
    assert all(expert_done(RunLayout(par), k) for k in (0, 1))
    assert (RunLayout(par).root / "experts" / "expert_1.log").is_file()

    # 3. "Separate machines": each job gets its own copy of the run directory, trains one expert through the
    #    CLI, and only that expert's directory travels back.
    sep = copy_run(sharded_run, tmp_path / "separate")
    for k in (0, 1):
        machine = copy_run(sharded_run, tmp_path / f"machine_{k}")
        assert main(["train-expert", "--run", str(machine), "--expert", str(k), "--no-progress"]) == 0
        assert not RunLayout(machine).expert(1 - k).exists()  # nothing of the other expert was touched
        shutil.copytree(RunLayout(machine).expert(k), RunLayout(sep).expert(k))
    assert f"expert {k}: 8 steps" in capsys.readouterr().out

    for k in (0, 1):
        w = _weights(seq, k)
        assert _same(w, _weights(par, k)) and _same(w, _weights(sep, k))
    assert not _same(_weights(seq, 0), _weights(seq, 1))  # different shards, different seeds

    # Re-running an expert that is finished changes nothing; the pipeline then skips the experts stage.
    before = (RunLayout(sep).expert(0) / "model" / "model.safetensors").read_bytes()
    assert read_json(RunLayout(sep).expert(0) / "run.json")["step"] == 8
    lines: list[str] = []
    run_pipeline(fast_config(), sep, log=lines.append)
    assert any("[5/9] experts: complete, skipped" in x for x in lines)
    assert (RunLayout(sep).expert(0) / "model" / "model.safetensors").read_bytes() == before
    assert RunLayout(sep).report.is_file()

    # The stage CLIs on the finished run: the dense baseline prints both FLOP totals side by side, and
    # eval-mixture re-evaluates on a subset.
    assert main(["train-dense", "--run", str(sep), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "training FLOPs: 2 experts x 8 steps x batch 4 = " in out and "| dense 8 steps x batch 8 = " in out
    assert "(ratio 1.0000)" in out
    assert main(["eval-mixture", "--run", str(sep), "--max-seqs", "8", "--prefix-lens", "4",
                 "--out", str(tmp_path / "eval.json")]) == 0
    evaluated = read_json(tmp_path / "eval.json")
    assert evaluated["num_seqs"] == 8 and [s["prefix_len"] for s in evaluated["prefix_sweep"]] == [4, 16]
    assert "mixture ppl" in capsys.readouterr().out
    # --data next to --run is honoured (not silently replaced by the run's own data), and the subset is named.
    other = small_data(tiny_data, tmp_path / "other", sizes=(("train", 60), ("valid", 30), ("test", 40)))
    assert main(["eval-mixture", "--run", str(sep), "--data", str(other), "--out", str(tmp_path / "other.json")]) == 0
    assert read_json(tmp_path / "other.json")["split_num_seqs"] == 40
    assert f"sequences of {other}" in capsys.readouterr().out
    report = RunLayout(sep).report.read_text()
    assert "32 test sequences (an evenly spaced subset of the 120 of the test split" in report
