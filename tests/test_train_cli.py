"""`smalltalk train` from the command line: presets, a run, resume/extension, bad input exits 2."""

from __future__ import annotations

import json
import shutil

from smalltalk.cli import main
from smalltalk.model.config import PRESETS


def _args(data, out, *extra):
    return ["train", "--data", str(data), "--out", str(out), "--model-preset", "tiny", "--train-preset", "tiny",
            "--batch-size", "4", "--eval-every", "2", "--eval-batches", "1", "--checkpoint-every", "2",
            "--no-progress", "--device", "cpu", *extra]


def test_list_presets_prints_parameter_counts(capsys):
    assert main(["train", "--list-presets"]) == 0
    out = capsys.readouterr().out
    assert f"expert-335m: {PRESETS['expert-335m'].num_params() / 1e6:.2f}M params" in out
    assert "cpu-small:" in out and "paper-router:" in out and "tiny:" in out


def test_train_resume_and_extend_from_the_cli(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(tiny_data, out, "--max-steps", "4")) == 0
    assert "done: step 4" in capsys.readouterr().out
    assert (out / "model" / "model.safetensors").is_file()
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["train"]["batch_size"] == 4 and config["model"]["name"] == "tiny"
    # The same command again does nothing new; a larger --max-steps extends the run.
    assert main(_args(tiny_data, out, "--max-steps", "4")) == 0
    assert main(_args(tiny_data, out, "--max-steps", "6")) == 0
    assert "resuming at step 4" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_bad_inputs_exit_2_with_one_line(tiny_data, tmp_path, capsys):
    assert main(_args(tmp_path / "missing", tmp_path / "r1")) == 2
    assert f"{tmp_path / 'missing'}: no manifest.json; run `smalltalk prepare" in capsys.readouterr().err
    broken = tmp_path / "broken"
    shutil.copytree(tiny_data, broken)
    shard = sorted((broken / "train").glob("shard_*.bin"))[0]
    shard.write_bytes(shard.read_bytes()[:-7])
    assert main(_args(broken, tmp_path / "r2")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(shard) in err and "truncated" in err and err.count("\n") == 1
    assert main(_args(tiny_data, tmp_path / "r3", "--max-seq-len", "8")) == 2
    assert "longer than the model's context" in capsys.readouterr().err
    assert main(_args(tiny_data, tmp_path / "r4", "--batch-size", "6", "--grad-accum", "4")) == 2
    assert "grad_accum=4 does not divide batch_size=6" in capsys.readouterr().err
