"""Mixture evaluation math, cost accounting and run configs: exact numbers, no training."""

from __future__ import annotations

import math

import numpy as np
import pytest

from smalltalk.errors import SmallTalkError
from smalltalk.mixture.bundle import fallback_expert
from smalltalk.run.config import RUN_PRESETS, RunConfig, load_run_config, run_preset
from smalltalk.run.costs import costs_markdown, run_costs
from smalltalk.mixture.evaluate import EvalConfig, soft_topk_nll, summarize
from smalltalk.mixture.scores import SequenceScores
from smalltalk.model.config import preset
from smalltalk.model.flops import inference_flops, training_flops
from smalltalk.routing import rule


def _tables(seed: int = 0, N: int = 12, E: int = 3, S: int = 9, M: int = 5) -> SequenceScores:
    rng = np.random.default_rng(seed)
    token_logp = -rng.uniform(0.1, 5.0, size=(N, E, S - 1)).astype(np.float32)
    return SequenceScores(expert_nll=-token_logp.sum(axis=2, dtype=np.float64),
                          dense_nll=rng.uniform(5, 30, size=N), router_logp=-rng.uniform(0.1, 3, (N, E, M - 1))
                          .astype(np.float32), expert_logp=token_logp, tokens_per_seq=S - 1,
                          domains=rng.integers(0, 2, N).astype(np.int16))


def test_fallback_is_largest_training_share_lowest_index_on_ties():
    assert fallback_expert([10, 30, 20]) == 1
    assert fallback_expert([30, 30, 20]) == 0
    assert fallback_expert([0, 0, 5, 5]) == 2


def test_routing_uses_first_prefix_tokens_and_argmax():
    logp = np.zeros((2, 2, 4), dtype=np.float32)  # 2 sequences, 2 routers, M = 5
    logp[0, 0] = [-1, -1, -9, -9]  # router 0 best on the first 2 predictions, worse on all 4
    logp[0, 1] = [-2, -2, -1, -1]
    logp[1, 1] = -0.5
    logp[1, 0] = -0.7
    scores = rule.window_scores(logp, 3)  # M-hat = 3: two predicted tokens
    assert rule.route(scores).tolist() == [0, 1] and scores[0].tolist() == [-2, -4]
    assert rule.route_logp(logp, 3).tolist() == [0, 1]
    assert rule.route_logp(logp, 5).tolist() == [1, 1]


def test_summarize_matches_a_direct_computation():
    t = _tables()
    N, E = t.expert_nll.shape
    T = t.tokens_per_seq
    out = summarize(t, prefix_len=5, prefix_lens=[2, 3], top_k=2, train_shares=[0.5, 0.25, 0.25],
                    domain_names=["a", "b"], bytes_per_token=3.0)
    routes = t.router_logp.sum(axis=2).argmax(axis=1)
    mix_nll = t.expert_nll[np.arange(N), routes].sum()
    assert out["mixture"]["ppl"] == pytest.approx(math.exp(mix_nll / (N * T)), rel=1e-12)
    assert out["dense"]["ppl"] == pytest.approx(math.exp(t.dense_nll.sum() / (N * T)), rel=1e-12)
    assert out["mixture"]["bpb"] == pytest.approx(mix_nll / math.log(2) / (N * T * 3.0), rel=1e-12)
    assert out["improvement_pct"] == pytest.approx(100 * (1 - out["mixture"]["ppl"] / out["dense"]["ppl"]))
    assert sum(r["num_seqs"] for r in out["per_expert"]) == N
    for r in out["per_expert"]:
        seg = routes == r["expert"]
        assert r["share"] == pytest.approx(seg.mean())
        if seg.any():
            assert r["expert_ppl"] == pytest.approx(math.exp(t.expert_nll[seg, r["expert"]].sum() / (seg.sum() * T)))
            assert r["dense_ppl"] == pytest.approx(math.exp(t.dense_nll[seg].sum() / (seg.sum() * T)))
            # The routed expert's entry on the diagonal of the cross matrix is its segment perplexity.
            assert out["cross_ppl"][r["expert"]][r["expert"]] == pytest.approx(r["expert_ppl"])
    assert [s["prefix_len"] for s in out["prefix_sweep"]] == [2, 3, 5]
    assert out["prefix_sweep"][-1]["ppl"] == pytest.approx(out["mixture"]["ppl"])
    assert out["prefix_sweep"][-1]["agreement"] == 1.0
    oracle = math.exp(t.expert_nll.min(axis=1).sum() / (N * T))
    assert out["oracle"]["ppl"] == pytest.approx(oracle) and oracle <= out["mixture"]["ppl"]
    counts = np.array(out["domains"]["counts"])
    assert counts.sum() == N and counts.shape == (2, E)


def test_soft_topk_equals_brute_force_mixture_of_distributions():
    t = _tables(seed=3)
    scores = t.router_scores(5)
    N, E, T = t.expert_logp.shape
    expected = 0.0
    for n in range(N):
        top = np.argsort(-scores[n], kind="stable")[:2]
        w = np.exp(scores[n, top] - scores[n, top].max())
        w /= w.sum()
        p = (w[:, None] * np.exp(t.expert_logp[n, top].astype(np.float64))).sum(axis=0)  # (T,)
        expected -= np.log(p).sum()
    assert soft_topk_nll(t, scores, 2) == pytest.approx(expected, rel=1e-9)
    # k = 1 is hard routing.
    routes = scores.argmax(axis=1)
    assert soft_topk_nll(t, scores, 1) == pytest.approx(t.expert_nll[np.arange(N), routes].sum(), rel=1e-6)


def test_prefix_sweep_longer_than_m_is_refused():
    with pytest.raises(SmallTalkError, match="M-hat must be <= M"):
        summarize(_tables(), prefix_len=5, prefix_lens=[9])


def test_costs_dense_equals_experts_and_terms_follow_the_formulas():
    expert, router = preset("cpu-small"), preset("cpu-router")
    c = run_costs(expert_cfg=expert, router_cfg=router, num_experts=4, seq_len=256, prefix_len=64, expert_steps=100,
                  expert_batch_size=16, dense_steps=100, dense_batch_size=64, router_steps=50, router_batch_size=16,
                  router_train_len=64, em_scored_seqs=1000, shard_scored_seqs=5000)
    assert c.experts_training == c.dense_training == 4 * training_flops(expert, 100, 16, 255)
    assert c.routers_training == 4 * training_flops(router, 50, 16, 63)
    assert c.experts_sharding == 5000 * 4 * inference_flops(router, 64)
    assert c.routers_sharding == 1000 * 4 * inference_flops(router, 64)
    assert c.mixture_training == c.experts_training + c.routers_training + c.routers_sharding + c.experts_sharding
    assert c.training_overhead_pct == pytest.approx(
        100 * (c.routers_training + c.routers_sharding + c.experts_sharding) / c.dense_training)
    assert c.inference_overhead_pct == pytest.approx(100 * 4 * inference_flops(router, 64) / inference_flops(expert, 256))
    md = costs_markdown(c)
    assert "experts data sharding (Eq. 16)" in md and f"{c.training_overhead_pct:.2f}%" in md


def test_every_run_preset_resolves_and_dense_matches_expert_tokens():
    for name in RUN_PRESETS:
        cfg = run_preset(name)
        dense, expert = cfg.dense_train(), cfg.expert_train
        assert dense.max_steps * dense.batch_size == cfg.num_experts * expert.max_steps * expert.batch_size
        if cfg.dense.is_default():  # the paper's protocol: the experts' steps at E x their batch
            assert (dense.max_steps, dense.batch_size) == (expert.max_steps, cfg.num_experts * expert.batch_size)
        assert (dense.schedule, dense.decay_start) == (expert.schedule, expert.rescaled(dense.max_steps).decay_start)
        assert cfg.routers.num_experts == cfg.num_experts and cfg.routers.prefix_len == cfg.prefix_len
        assert RunConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()  # the saved form round-trips
    assert {cfg.expert_train_config(k).seed for k in range(4) for cfg in [run_preset("tiny")]} == {1, 2, 3, 4}


def test_a_preset_built_on_another_changes_only_what_it_names():
    """cpu-tuned is the cpu run (data, routers, architecture, tokens) with the map's tuned training on both sides."""
    base, tuned = run_preset("cpu").to_dict(), run_preset("cpu-tuned")
    same = lambda d: {k: v for k, v in d.items() if k not in ("name", "dense", "expert_train")}  # noqa: E731
    assert same(tuned.to_dict()) == same(base) and "dense" not in base
    dense = tuned.dense_train()
    assert (tuned.expert_train.batch_size, tuned.expert_train.lr, tuned.expert_train.schedule) == (8, 0.01, "wsd")
    assert (dense.batch_size, dense.max_steps, dense.lr, dense.schedule) == (32, 4000, 0.02, "wsd")


def test_presets_built_on_each_other_in_a_cycle_are_refused(monkeypatch):
    from smalltalk.run import config

    monkeypatch.setitem(config.RUN_PRESETS, "loop-a", lambda: {"preset": "loop-b", "seed": 1})
    monkeypatch.setitem(config.RUN_PRESETS, "loop-b", lambda: {"preset": "loop-a", "seed": 2})
    with pytest.raises(SmallTalkError, match="cycle: loop-a -> loop-b -> loop-a"):
        RunConfig.from_dict({"preset": "loop-a"})


def test_dense_section_tunes_the_baseline_at_equal_tokens():
    base = run_preset("cpu")
    assert "dense" not in base.to_dict()  # the paper's protocol is the absence of a `dense` section
    t = base.expert_train
    cfg = RunConfig.from_dict({"preset": "cpu", "dense": {"batch_size": 16, "lr": 0.005}})
    dense = cfg.dense_train()
    assert dense.batch_size * dense.max_steps == 4 * t.batch_size * t.max_steps  # equal tokens, equal FLOPs
    assert (dense.batch_size, dense.max_steps, dense.lr) == (16, 16 * t.max_steps, 0.005)
    # warm-up, validation and checkpoints keep their fraction of training
    assert (dense.warmup_steps, dense.eval_every) == (16 * t.warmup_steps, 16 * t.eval_every)
    assert cfg.expert_train == base.expert_train  # the experts are untouched
    assert RunConfig.from_dict(cfg.to_dict()).dense_train() == dense
    steps_only = RunConfig.from_dict({"preset": "cpu", "dense": {"max_steps": 2000}}).dense_train()
    assert (steps_only.batch_size, steps_only.lr) == (64, t.lr)


@pytest.mark.parametrize("dense, match", [
    ({"batch_size": 48}, "must see as many tokens"),
    ({"batch_size": 16, "max_steps": 100}, "16 x 100"),
    ({"lr": 0}, "dense.lr=0 must be positive"),
    ({"lr": "fast"}, "lr='fast' must be"),
    ({"steps": 10}, "unknown keys \\['steps'\\]"),
])
def test_dense_section_refuses_unequal_flops_and_bad_values(dense, match):
    with pytest.raises(SmallTalkError, match=match):
        RunConfig.from_dict({"preset": "cpu", "dense": dense})


def test_yaml_config_overrides_a_preset(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: tiny\nname: mine\nnum_experts: 2\nseed: 7\nexpert_train: {max_steps: 33}\n"
                    "routers: {iterations: 2}\neval: {max_seqs: 10, prefix_lens: [4]}\n")
    cfg = load_run_config(path)
    assert (cfg.name, cfg.num_experts, cfg.seed) == ("mine", 2, 7)
    assert cfg.expert_train.max_steps == 33 and cfg.expert_train.batch_size == run_preset("tiny").expert_train.batch_size
    assert cfg.routers.iterations == 2 and cfg.routers.num_experts == 2 and cfg.routers.seed == 7
    assert cfg.eval == EvalConfig(max_seqs=10, prefix_lens=[4], device=cfg.device)
    assert cfg.dense_train().batch_size == 2 * cfg.expert_train.batch_size


@pytest.mark.parametrize("text, match", [
    ("preset: tiny\nnum_experts: 1\n", "at least 2 experts"),
    ("preset: tiny\nexpert_train: {bogus: 1}\n", "unknown keys"),
    ("preset: tiny\nprefix_len: 8\neval: {prefix_lens: [16]}\n", "prefix_lens"),
    ("preset: nope\n", "preset='nope' is unknown"),
    ("preset: tiny\nexpert_train: {loss_prefix_len: 8}\n", "whole sequences"),
    ("- just\n- a list\n", "must be a mapping"),
    ("preset: tiny\nnum_experts: [\n", "cannot parse"),
])
def test_bad_run_configs_are_named(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SmallTalkError, match=match):
        load_run_config(path)


def test_unknown_config_spec():
    with pytest.raises(SmallTalkError, match="neither a run preset"):
        load_run_config("no-such-preset-or-file")


def test_run_presets_are_yaml_recipes_a_user_can_copy(tmp_path, capsys):
    from smalltalk.cli import main
    from smalltalk.run.config import PRESETS_DIR

    assert sorted(RUN_PRESETS) == sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")) and "tiny" in RUN_PRESETS
    assert main(["run", "--list-presets"]) == 0
    out = capsys.readouterr().out
    assert all(f"{name}: " in out for name in RUN_PRESETS) and str(PRESETS_DIR) in out
    # A copied recipe with one field changed is that preset with that override.
    mine = tmp_path / "mine.yaml"
    mine.write_text((PRESETS_DIR / "cpu.yaml").read_text().replace("num_experts: 4", "num_experts: 8"))
    assert load_run_config(mine).to_dict() == run_preset("cpu", num_experts=8).to_dict()


def test_a_preset_name_with_the_number_of_experts_points_at_the_base_preset(capsys):
    from smalltalk.cli import main

    assert main(["run", "--config", "cpu-e8", "--print-config"]) == 2
    assert "use preset 'cpu' with num_experts: 8" in capsys.readouterr().err
    with pytest.raises(SmallTalkError, match="use preset 'paper-335m' with num_experts: 4"):
        RunConfig.from_dict({"preset": "paper-335m-e4"})


def test_a_preset_path_under_the_old_recipes_folder_names_the_new_one():
    with pytest.raises(SmallTalkError, match="the run presets moved to .*presets/cpu.yaml .*--config cpu"):
        load_run_config("src/smalltalk/recipes/cpu.yaml")
