"""Data parallel training under torchrun (2 CPU processes, gloo) matches one process on the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from smalltalk.model.io import load_model_dir


def _train(tiny_data, out, launcher):
    args = ["-m", "smalltalk", "train", "--data", str(tiny_data), "--out", str(out), "--model-preset", "tiny",
            "--train-preset", "tiny", "--max-steps", "3", "--batch-size", "8", "--grad-accum", "2",
            "--warmup-steps", "1", "--eval-every", "3", "--eval-batches", "1", "--checkpoint-every", "2",
            "--device", "cpu", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, *launcher, *args], capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_process_ddp_matches_single_process(tiny_data, tmp_path):
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    ddp = _train(tiny_data, tmp_path / "ddp", torchrun)
    single = _train(tiny_data, tmp_path / "single", [])
    assert [r["step"] for r in ddp] == [1, 2, 3]
    for a, b in zip(ddp, single):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)
        assert a["tokens"] == b["tokens"] and a["flops"] == b["flops"]
    assert ddp[-1]["val_loss"] == pytest.approx(single[-1]["val_loss"], abs=1e-4)
    # Rank 0 alone wrote checkpoints and the model; both runs end at (nearly) the same weights.
    ckpts = sorted(p.name for p in (tmp_path / "ddp" / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000002", "step_00000003"]
    config = json.loads((tmp_path / "ddp" / "checkpoints" / "step_00000003" / "config.json").read_text())
    assert config["world_size"] == 2
    m_ddp, _ = load_model_dir(tmp_path / "ddp" / "model")
    m_one, _ = load_model_dir(tmp_path / "single" / "model")
    for (name, p), q in zip(m_ddp.state_dict().items(), m_one.state_dict().values()):
        torch.testing.assert_close(p, q, atol=2e-5, rtol=0, msg=name)
