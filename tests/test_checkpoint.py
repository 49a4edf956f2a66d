"""Checkpoints: exact resume, refusal on config/tokenizer change, corruption, disk full, model directories."""

from __future__ import annotations

import errno
import json
import re
import shutil

import pytest
import torch

from smalltalk.errors import SmallTalkError
from smalltalk.model.config import preset
from smalltalk.model.io import load_model_dir, save_model_dir
from smalltalk.model.transformer import Transformer
from smalltalk.train import checkpoint as ckpt_lib
from smalltalk.train.config import train_preset
from smalltalk.data.splits import load_split
from smalltalk.train.trainer import Trainer, model_config_for_data


@pytest.fixture(scope="module")
def splits(tiny_data):
    return load_split(tiny_data, "train"), load_split(tiny_data, "valid")


def _cfgs(splits, **train_overrides):
    train, _ = splits
    model_cfg = model_config_for_data(preset("tiny"), train)
    base = dict(max_steps=8, batch_size=4, warmup_steps=3, eval_every=4, eval_batches=1, checkpoint_every=3,
                keep_last_k=2)
    return model_cfg, train_preset("tiny", **{**base, **train_overrides})


@pytest.fixture(scope="module")
def finished_run(splits, tmp_path_factory):
    """A completed 6-step run (checkpoints at 3 and 6) that tests copy before modifying."""
    model_cfg, train_cfg = _cfgs(splits, max_steps=6)
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    Trainer(model_cfg, train_cfg, splits[0], run_dir).train()
    return run_dir


def _copy_run(finished_run, tmp_path):
    shutil.copytree(finished_run, tmp_path / "run")
    return tmp_path / "run"


def _losses(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"], r.get("val_loss")) for r in map(json.loads, lines)]


def test_interrupted_run_resumes_exactly(splits, tmp_path):
    model_cfg, train_cfg = _cfgs(splits)
    train, valid = splits
    full = Trainer(model_cfg, train_cfg, train, tmp_path / "full", valid_data=valid)
    full.train()

    # Run to step 5 (checkpoints at 3 and 5), then lose step 5's checkpoint as if killed before writing it:
    # the restart resumes from step 3 and redoes steps 4 and 5 (including the evaluation at step 4).
    part = tmp_path / "part"
    Trainer(model_cfg, train_cfg, train, part, valid_data=valid).train(until_step=5)
    shutil.rmtree(part / "checkpoints" / "step_00000005")
    resumed = Trainer(model_cfg, train_cfg, train, part, valid_data=valid)
    assert resumed.step == 3 and resumed.resumed_from.name == "step_00000003"
    resumed.train()

    assert [s for s, _, _ in _losses(part)] == list(range(1, 9))
    assert [s for s, _, val in _losses(part) if val is not None] == [4, 8]
    assert _losses(part) == _losses(tmp_path / "full")  # same floats, bit for bit
    for name, tensor in full.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name
    # Only the last K=2 checkpoints are kept.
    assert [p.name for _, p in ckpt_lib.list_checkpoints(part / "checkpoints")] == ["step_00000006", "step_00000008"]
    assert (part / "checkpoints" / "latest").read_text().strip() == "step_00000008"
    # The final model directory holds the same weights.
    model, config = load_model_dir(part / "model")
    assert config["step"] == 8 and config["tokenizer_sha256"] == train.tokenizer_sha256
    assert torch.equal(model.embed_in.weight, full.model.embed_in.weight)


def test_finished_run_is_not_retrained(splits, finished_run):
    model_cfg, train_cfg = _cfgs(splits, max_steps=6)
    again = Trainer(model_cfg, train_cfg, splits[0], finished_run)
    assert again.step == 6
    summary = again.train()
    assert summary["step"] == 6 and len(_losses(finished_run)) == 6


def test_resume_refuses_other_model_config(splits, finished_run):
    model_cfg, train_cfg = _cfgs(splits, max_steps=6)
    with pytest.raises(SmallTalkError, match=r"another model config.*hidden_size.*\(64, 32\)"):
        Trainer(model_cfg.replace(hidden_size=32), train_cfg, splits[0], finished_run)


def test_resume_refuses_other_tokenizer(splits, finished_run):
    model_cfg, train_cfg = _cfgs(splits, max_steps=6)
    with pytest.raises(SmallTalkError, match="tokenizer sha256"):
        Trainer(model_cfg, train_cfg, splits[0], finished_run, tokenizer_sha256="0" * 64)


@pytest.mark.parametrize("victim", ["model.safetensors", "optimizer.pt", "state.json"])
def test_corrupt_checkpoint_file_is_named(splits, finished_run, tmp_path, victim):
    model_cfg, train_cfg = _cfgs(splits, max_steps=6)
    run_dir = _copy_run(finished_run, tmp_path)
    path = run_dir / "checkpoints" / "step_00000006" / victim
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    path.write_bytes(bytes(data))
    with pytest.raises(SmallTalkError) as info:
        Trainer(model_cfg, train_cfg, splits[0], run_dir)
    message = str(info.value)
    assert str(path) in message and "delete" in message and "resume from step_00000003" in message
    # Following the advice works: the previous checkpoint resumes.
    shutil.rmtree(path.parent)
    assert Trainer(model_cfg, train_cfg, splits[0], run_dir).step == 3


def test_truncated_weights_in_model_dir(splits, tmp_path):
    model = Transformer(model_config_for_data(preset("tiny"), splits[0]))
    save_model_dir(tmp_path / "m", model, splits[0].tokenizer_file)
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(SmallTalkError, match=r"model\.safetensors.*corrupt or truncated"):
        load_model_dir(tmp_path / "m")


def test_disk_full_during_checkpoint_keeps_previous(splits, tmp_path, monkeypatch):
    model_cfg, train_cfg = _cfgs(splits, checkpoint_every=2)
    trainer = Trainer(model_cfg, train_cfg, splits[0], tmp_path)
    trainer.train(until_step=2)
    good = tmp_path / "checkpoints" / "step_00000002"
    before = {p.name: p.read_bytes() for p in good.iterdir()}

    real_save = torch.save

    def save_until_disk_full(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)  # part of the file reaches the disk ...
        raise OSError(errno.ENOSPC, "No space left on device")  # ... then the device is full

    monkeypatch.setattr(torch, "save", save_until_disk_full)
    with pytest.raises(SmallTalkError, match=r"step_00000004: no space left on device.*step_00000002 is intact"):
        trainer.train(until_step=4)
    monkeypatch.undo()

    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_00000002"]
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    resumed = Trainer(model_cfg, train_cfg, splits[0], tmp_path)
    assert resumed.step == 2
    resumed.train(until_step=4)
    assert resumed.step == 4


def test_nan_loss_stops_and_keeps_last_good_checkpoint(splits, tmp_path):
    model_cfg, train_cfg = _cfgs(splits, checkpoint_every=2)
    trainer = Trainer(model_cfg, train_cfg, splits[0], tmp_path)
    trainer.train(until_step=4)
    with torch.no_grad():  # the weights blow up (as after a bad update): every logit becomes NaN
        trainer.model.final_layer_norm.bias.fill_(float("nan"))
    with pytest.raises(SmallTalkError, match=r"diverged at step 5: loss=nan.*step_00000004"):
        trainer.train()
    assert ckpt_lib.latest_checkpoint(tmp_path / "checkpoints").name == "step_00000004"
    assert not (tmp_path / "model").exists()
    resumed = Trainer(model_cfg, train_cfg, splits[0], tmp_path)
    assert resumed.step == 4 and torch.isfinite(resumed.model.final_layer_norm.bias).all()


def test_huge_learning_rate_diverges_with_clear_error(splits, tmp_path):
    model_cfg, train_cfg = _cfgs(splits, lr=1e35, warmup_steps=0, checkpoint_every=1, max_steps=8)
    with pytest.raises(SmallTalkError, match=r"diverged at step (\d+)") as info:
        Trainer(model_cfg, train_cfg, splits[0], tmp_path).train()
    bad_step = int(re.search(r"step (\d+)", str(info.value)).group(1))
    newest = ckpt_lib.latest_checkpoint(tmp_path / "checkpoints")
    # Checkpoints are written every step, so the newest is the step before the divergence.
    assert newest.name == f"step_{bad_step - 1:08d}" and newest.name in str(info.value)


def test_model_dir_round_trip_without_duplicate_tied_weights(splits, tmp_path):
    from safetensors import safe_open

    model_cfg = model_config_for_data(preset("tiny"), splits[0])
    torch.manual_seed(0)
    model = Transformer(model_cfg)
    save_model_dir(tmp_path / "m", model, splits[0].tokenizer_file, extra={"note": "x"})
    with safe_open(tmp_path / "m" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "embed_out.weight" not in keys and "embed_in.weight" in keys
    loaded, config = load_model_dir(tmp_path / "m")
    assert config["note"] == "x" and config["model"] == model_cfg.to_dict()
    assert (tmp_path / "m" / "tokenizer.json").read_bytes() == splits[0].tokenizer_file.read_bytes()
    assert loaded.embed_out.weight is loaded.embed_in.weight
    idx = torch.from_numpy(splits[0].dataset.get([0, 1]))
    assert torch.equal(loaded(idx), model.eval()(idx))
