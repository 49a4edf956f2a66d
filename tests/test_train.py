"""Trainer: schedules, optimizer groups, data order, learning on real text, accumulation, Eq. 9 prefixes, bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from smalltalk.data.shards import TokenDataset, write_shard
from smalltalk.errors import SmallTalkError
from smalltalk.model.config import preset
from smalltalk.model.flops import training_flops_per_step
from smalltalk.model.io import load_model_dir
from smalltalk.model.transformer import Transformer
from smalltalk.train.config import TRAIN_PRESETS, TrainConfig, train_preset
from smalltalk.data.splits import load_split
from smalltalk.train.optim import lr_at, param_groups
from smalltalk.train.sampler import Sampler
from smalltalk.train.trainer import Trainer, model_config_for_data


@pytest.fixture(scope="module")
def splits(tiny_data):
    return load_split(tiny_data, "train"), load_split(tiny_data, "valid")


@pytest.fixture(scope="module")
def model_cfg(splits):
    return model_config_for_data(preset("tiny"), splits[0])


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- config, schedules, optimizer


def test_schedules_match_the_paper():
    cos = TrainConfig(lr=1e-3, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_at(0, cos) == pytest.approx(1e-4)  # first update: lr / warmup, never 0
    assert lr_at(9, cos) == pytest.approx(1e-3)
    assert lr_at(10, cos) == pytest.approx(1e-3)
    assert lr_at(60, cos) == pytest.approx(1e-4 + 0.5 * 9e-4)  # half-way through the cosine
    assert lr_at(110, cos) == pytest.approx(1e-4) and lr_at(500, cos) == pytest.approx(1e-4)
    const = TrainConfig(lr=1e-4, warmup_steps=1000, schedule="constant", max_steps=128_000)
    assert lr_at(499, const) == pytest.approx(5e-5)
    assert lr_at(1000, const) == lr_at(127_999, const) == 1e-4
    router = TRAIN_PRESETS["paper-router"]
    assert (router.lr, router.warmup_steps, router.batch_size, router.loss_prefix_len) == (1e-4, 1000, 32, 256)
    expert = TRAIN_PRESETS["paper-expert"]
    assert (expert.lr, expert.warmup_steps, expert.beta1, expert.beta2, expert.weight_decay, expert.grad_clip) == \
        (5e-4, 3000, 0.9, 0.99, 0.1, 0.1)


def test_wsd_is_stable_then_decays_linearly_and_each_budget_shares_the_stable_phase():
    wsd = TrainConfig(lr=1e-3, warmup_steps=10, max_steps=110, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.1)
    assert wsd.decay_start == 88
    assert lr_at(0, wsd) == pytest.approx(1e-4) and lr_at(10, wsd) == lr_at(87, wsd) == 1e-3
    assert lr_at(98, wsd) == pytest.approx(1e-3 - 0.5 * 9e-4, rel=0.1)  # half-way down the decay
    assert lr_at(109, wsd) == pytest.approx(1e-4) and lr_at(500, wsd) == pytest.approx(1e-4)
    assert all(lr_at(i, wsd) >= lr_at(i + 1, wsd) for i in range(10, 120))
    # A longer budget of the same run: identical through the shorter one's stable phase.
    longer = wsd.replace(max_steps=220)
    assert [lr_at(i, longer) for i in range(88)] == [lr_at(i, wsd) for i in range(88)]
    assert wsd.to_dict()["decay_fraction"] == 0.2 and "decay_fraction" not in TrainConfig().to_dict()
    assert TrainConfig.from_dict(wsd.to_dict()) == wsd and "wsd, decay from step 88" in wsd.describe()
    with pytest.raises(SmallTalkError, match="decay_fraction=0 must be in"):
        TrainConfig(schedule="wsd", decay_fraction=0)


@pytest.mark.parametrize("changes, field", [
    ({"schedule": "linear"}, "schedule"), ({"batch_size": 10, "grad_accum": 4}, "grad_accum"),
    ({"lr": 0.0}, "lr"), ({"max_steps": 0}, "max_steps"), ({"loss_prefix_len": 1}, "loss_prefix_len"),
    ({"precision": "fp16"}, "precision"),
])
def test_bad_train_config_names_the_field(changes, field):
    with pytest.raises(SmallTalkError, match=field):
        TrainConfig(**changes)
    with pytest.raises(SmallTalkError, match="unknown train preset 'huge'"):
        train_preset("huge")


def test_weight_decay_skips_biases_and_layernorms(model_cfg):
    model = Transformer(model_cfg)
    decay, no_decay = param_groups(model, 0.1)
    L, H = model_cfg.num_layers, model_cfg.hidden_size
    # Matrices: embedding (tied, counted once) + 4 per layer; vectors: 4 biases + 2 LN x 2 per layer + final LN.
    assert len(decay["params"]) == 1 + 4 * L and decay["weight_decay"] == 0.1
    assert len(no_decay["params"]) == 8 * L + 2 and no_decay["weight_decay"] == 0.0
    assert sum(p.numel() for p in decay["params"] + no_decay["params"]) == model_cfg.num_params()
    assert all(p.dim() == 1 for p in no_decay["params"]) and H > 0


# ----------------------------------------------------------------------------- data order


def test_sampler_is_deterministic_epoch_complete_and_resumable():
    indices = np.arange(100, 137)
    a = Sampler(indices, seed=7)
    first_epoch = a.next(37)
    assert sorted(first_epoch) == list(range(100, 137)) and not np.array_equal(first_epoch, indices)
    a.next(20)  # straddles nothing yet; next call crosses into epoch 2
    state = a.state_dict()
    b = Sampler(np.arange(5), seed=0)
    b.load_state_dict(state, indices)
    assert np.array_equal(a.next(30), b.next(30))  # crosses the epoch boundary identically
    assert a.epoch == 2 and a.consumed == 87
    assert np.array_equal(Sampler(indices, seed=7).next(37), first_epoch)
    assert not np.array_equal(Sampler(indices, seed=8).next(37), first_epoch)
    # Re-applying the same set keeps the position; a new set restarts with a fresh order.
    assert a.set_indices(indices.copy()) is False and a.consumed == 87
    assert a.set_indices(np.arange(10)) is True and (a.consumed, a.generation) == (0, 1)
    assert sorted(a.next(10)) == list(range(10))


# ----------------------------------------------------------------------------- training


def test_tiny_run_learns_and_logs(splits, model_cfg, tmp_path):
    train, valid = splits
    cfg = train_preset("tiny", max_steps=24, batch_size=8, warmup_steps=5, eval_every=12, eval_batches=2,
                       checkpoint_every=12)
    summary = Trainer(model_cfg, cfg, train, tmp_path, valid_data=valid).train()
    records = _metrics(tmp_path)
    assert [r["step"] for r in records] == list(range(1, 25))
    losses = [r["loss"] for r in records]
    # Starts near uniform over the vocabulary and learns real structure (word frequencies) in 24 steps.
    assert abs(losses[0] - math.log(model_cfg.vocab_size)) < 0.3
    assert np.mean(losses[-5:]) < losses[0] - 0.6
    per_step = training_flops_per_step(model_cfg, 8, train.dataset.seq_len - 1)
    assert records[-1]["flops"] == 24 * per_step and records[-1]["tokens"] == 24 * 8 * (train.dataset.seq_len - 1)
    assert records[0]["lr"] == pytest.approx(cfg.lr / 5) and records[-1]["lr"] == pytest.approx(lr_at(23, cfg))
    assert all(r["tokens_per_s"] > 0 for r in records)
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [12, 24]
    assert evals[1]["val_loss"] < evals[0]["val_loss"] < math.log(model_cfg.vocab_size)
    assert evals[1]["val_ppl"] == pytest.approx(math.exp(evals[1]["val_loss"]))
    assert 0 < evals[1]["val_bpb"] < 8
    model, config = load_model_dir(tmp_path / "model")
    assert config["step"] == 24 and config["valid"]["loss"] == pytest.approx(evals[1]["val_loss"])
    assert (tmp_path / "tokenizer.json").read_bytes() == train.tokenizer_file.read_bytes()  # run dir is self-contained
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["step"] == 24 and run["valid"] == summary["valid"]


def test_gradient_accumulation_matches_one_big_batch(splits, model_cfg, tmp_path):
    cfg = train_preset("tiny", max_steps=3, batch_size=8, warmup_steps=2, eval_every=0, checkpoint_every=0)
    one = Trainer(model_cfg, cfg, splits[0], tmp_path / "one")
    accum = Trainer(model_cfg, cfg.replace(grad_accum=4), splits[0], tmp_path / "accum")
    assert accum.micro_batch == 2
    for _ in range(3):
        a, b = one.train_step(), accum.train_step()
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    # Adam divides by sqrt(v): summation-order noise (~1e-7) grows to a few 1e-6, against updates of ~1e-3.
    for (name, p), q in zip(one.model.named_parameters(), accum.model.parameters()):
        torch.testing.assert_close(p, q, atol=2e-5, rtol=0, msg=name)


def test_loss_prefix_len_trains_on_the_first_m_tokens(splits, model_cfg, tmp_path):
    prefix = 16
    cfg = train_preset("tiny", max_steps=1, batch_size=4, warmup_steps=1, loss_prefix_len=prefix,
                       checkpoint_every=0, eval_every=0)
    trainer = Trainer(model_cfg, cfg, splits[0], tmp_path)
    assert trainer.tokens_per_step == 4 * (prefix - 1)
    # The same first batch, scored by an identically initialised model on x[:, :M] (Eq. 9).
    batch = Sampler(np.arange(len(splits[0].dataset)), seed=cfg.seed).next(4)
    x = torch.from_numpy(splits[0].dataset.get(batch)[:, :prefix])
    torch.manual_seed(cfg.seed)
    _, expected = Transformer(model_cfg)(x[:, :-1], x[:, 1:])
    assert trainer.train_step()["loss"] == pytest.approx(expected.item(), abs=1e-6)


def test_em_style_index_switch_keeps_optimizer_and_resumes(splits, model_cfg, tmp_path):
    n = len(splits[0].dataset)
    seg_a, seg_b = np.arange(0, n // 2), np.arange(n // 2, n)
    cfg = train_preset("tiny", max_steps=6, batch_size=4, warmup_steps=1, schedule="constant", eval_every=0,
                       checkpoint_every=0)
    trainer = Trainer(model_cfg, cfg, splits[0], tmp_path, indices=seg_a)
    trainer.train(until_step=3)
    adam_steps = [float(s["step"]) for s in trainer.optimizer.state.values()]
    assert trainer.set_indices(seg_b) is True
    trainer.train(until_step=6)
    assert all(float(s["step"]) == 6 for s in trainer.optimizer.state.values()) and set(adam_steps) == {3.0}
    saved = np.load(tmp_path / "checkpoints" / "step_00000006" / "indices.npy")
    assert np.array_equal(saved, seg_b)
    state = json.loads((tmp_path / "checkpoints" / "step_00000006" / "state.json").read_text())
    assert state["sampler"]["generation"] == 1 and state["sampler"]["consumed"] == 3 * 4
    # A restart resumes on segment B; re-applying it keeps the position.
    again = Trainer(model_cfg, cfg, splits[0], tmp_path, indices=seg_a)
    assert again.step == 6 and np.array_equal(again.sampler.indices, seg_b)
    assert again.set_indices(seg_b) is False and again.sampler.consumed == 12


# ----------------------------------------------------------------------------- bad input


def test_sequence_longer_than_context_is_refused(splits, model_cfg, tmp_path):
    short = model_cfg.replace(max_seq_len=splits[0].dataset.seq_len // 2)
    with pytest.raises(SmallTalkError, match=r"longer than the model's context \(max_seq_len="):
        Trainer(short, train_preset("tiny"), splits[0], tmp_path)


def test_indices_out_of_range_are_refused(splits, model_cfg, tmp_path):
    with pytest.raises(SmallTalkError, match=r"training indices must lie in \[0, "):
        Trainer(model_cfg, train_preset("tiny"), splits[0], tmp_path, indices=np.array([0, 10**9]))


def test_empty_and_truncated_shards_are_refused(splits, model_cfg, tmp_path):
    seq_len, vocab = splits[0].dataset.seq_len, splits[0].dataset.vocab_size
    empty = tmp_path / "empty" / "shard_00000.bin"
    write_shard(empty, np.zeros((0, seq_len), dtype=np.int64), None, vocab)
    with pytest.raises(SmallTalkError, match="training split has no sequences"):
        Trainer(model_cfg, train_preset("tiny"), TokenDataset([empty]), tmp_path / "run")
    real = splits[0].dataset.shards[0].path
    cut = tmp_path / "cut" / "shard_00000.bin"
    cut.parent.mkdir()
    cut.write_bytes(real.read_bytes()[:-100])
    with pytest.raises(SmallTalkError, match=r"shard_00000\.bin: shard is truncated"):
        TokenDataset([cut])
    zero = tmp_path / "zero" / "shard_00000.bin"
    zero.parent.mkdir()
    zero.write_bytes(b"")
    with pytest.raises(SmallTalkError, match="empty or truncated"):
        TokenDataset.from_dir(zero.parent)


def test_progress_lines_when_stderr_is_not_a_terminal(tmp_path, capsys):
    """Inside `smalltalk run` logs (stderr not a TTY) training still reports step / loss / rate every tenth."""
    from smalltalk.train.metrics import MetricsLogger

    logger = MetricsLogger(tmp_path, total_steps=20, tensorboard=False)
    for step in range(1, 21):
        logger.progress(step, loss=3.25, tok_s=12345.0)
    logger.close()
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("step ")]
    assert len(lines) == 10 and lines[-1].startswith("step 20/20 loss 3.25 tok_s 12,345 (")
