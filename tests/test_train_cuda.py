"""CUDA path of the trainer (bf16 autocast, CUDA RNG in checkpoints, torch.compile); skipped without a GPU.

The sample corpus does not travel to GPU machines, so these use a shard of random tokens: they test
the mechanics (precision, resume, compile), not learning, which the CPU tests cover on real text.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from smalltalk.data.shards import TokenDataset, write_shard
from smalltalk.model.config import preset
from smalltalk.train.config import train_preset
from smalltalk.train.trainer import Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def random_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("cuda_data") / "train" / "shard_00000.bin"
    tokens = np.random.default_rng(0).integers(0, 512, size=(256, 129))
    write_shard(path, tokens, None, 512)
    return TokenDataset([path])


def _cfgs(**overrides):
    model_cfg = preset("tiny", vocab_size=512, max_seq_len=128)
    train_cfg = train_preset("tiny", max_steps=6, batch_size=8, warmup_steps=2, eval_every=0, checkpoint_every=3,
                             device="cuda", **overrides)
    return model_cfg, train_cfg


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_bf16_autocast_training_resumes(random_data, tmp_path):
    model_cfg, train_cfg = _cfgs()
    full = Trainer(model_cfg, train_cfg, random_data, tmp_path / "full")
    assert full.device.type == "cuda" and full.autocast_dtype == torch.bfloat16
    full.train()
    assert all(p.dtype == torch.float32 for p in full.model.parameters())  # fp32 master weights
    state = json.loads((tmp_path / "full" / "checkpoints" / "step_00000006" / "state.json").read_text())
    assert "cuda" in state["rng"]

    part = tmp_path / "part"
    Trainer(model_cfg, train_cfg, random_data, part).train(until_step=5)
    shutil.rmtree(part / "checkpoints" / "step_00000005")
    resumed = Trainer(model_cfg, train_cfg, random_data, part)
    assert resumed.step == 3
    resumed.train()
    # GPU attention backward may accumulate in a varying order, so this is close, not bitwise (CPU tests are).
    # A wrong resume (other batches, lost Adam moments) is off by ~0.05 in loss and ~lr per step in weights.
    np.testing.assert_allclose(_losses(part), _losses(tmp_path / "full"), rtol=0, atol=2e-3)
    for (name, p), q in zip(full.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-3, rtol=0, msg=name)


def test_compiled_model_matches_eager(random_data, tmp_path):
    model_cfg, train_cfg = _cfgs()
    eager = Trainer(model_cfg, train_cfg, random_data, tmp_path / "eager")
    compiled = Trainer(model_cfg, train_cfg.replace(compile=True), random_data, tmp_path / "compiled")
    for _ in range(3):
        a, b = eager.train_step(), compiled.train_step()
        assert a["loss"] == pytest.approx(b["loss"], abs=2e-2)  # bf16: fused kernels round differently
