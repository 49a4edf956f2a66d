"""Split training (`seed_fraction`): a dense seed, experts branched from it, equal FLOPs, f = 0 unchanged,
resume after SIGKILL, provenance and bad input refused, and `grow` on a split bundle."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from smalltalk.errors import SmallTalkError
from smalltalk.io import atomic_write_json, read_json
from smalltalk.model.io import sha256_file
from smalltalk.run.experts import train_expert
from smalltalk.run.layout import RunLayout
from smalltalk.run.pipeline import run_pipeline
from smalltalk.train.layout import read_metrics
from smalltalk.train.optim import lr_at
from test_pipeline import copy_run, fast_config, sharded_run  # noqa: F401  (module fixture reused)

HALF = 0.5  # fast_config: 2 experts x 8 steps x batch 4; dense 8 steps x batch 8 -> seed 4 steps, experts from step 4


def split_copy(src: Path, dst: Path) -> Path:
    """The sharded run (data, routers, shards) as a new run directory: its config may then differ in seed_fraction."""
    copy_run(src, dst)
    RunLayout(dst).config.unlink()
    return dst


def _weights(path: Path) -> str:
    return sha256_file(path / "model.safetensors")


@pytest.fixture(scope="module")
def pure_run(sharded_run, tmp_path_factory):
    run = copy_run(sharded_run, tmp_path_factory.mktemp("pure") / "run")
    run_pipeline(fast_config(), run, until="dense", log=lambda m: None)
    return run


@pytest.fixture(scope="module")
def split_run(sharded_run, tmp_path_factory):
    run = split_copy(sharded_run, tmp_path_factory.mktemp("split") / "run")
    lines: list[str] = []
    run_pipeline(fast_config(seed_fraction=HALF), run, log=lines.append)
    return run, lines


def test_a_split_run_branches_experts_from_the_dense_seed_at_equal_flops(split_run, pure_run):
    run, lines = split_run
    L, P = RunLayout(run), RunLayout(pure_run)
    cfg = fast_config(seed_fraction=HALF)
    assert any("[4/9] seed: done" in x for x in lines)
    seed = read_json(L.seed / "seed.json")
    assert seed["step"] == 4 and (run / seed["checkpoint"]).is_dir()
    # The seed is the dense run's beginning: the dense model equals the pure run's, bit for bit.
    assert _weights(L.dense_model) == _weights(P.dense_model)
    assert [r["loss"] for r in read_metrics(L.dense) if "loss" in r] == \
        [r["loss"] for r in read_metrics(P.dense) if "loss" in r]
    for k in range(2):
        records = [r for r in read_metrics(L.expert(k)) if "loss" in r]
        assert [r["step"] for r in records] == [5, 6, 7, 8]
        # No re-warm-up: the expert goes on at its schedule's learning rate where the seed stopped.
        assert records[0]["lr"] == pytest.approx(lr_at(4, cfg.expert_train_config(k)))
        assert lr_at(3, cfg.seed_train()) == pytest.approx(lr_at(3, cfg.expert_train_config(k)))
        assert _weights(L.expert_model(k)) != _weights(P.expert_model(k))
        assert read_json(L.expert(k) / "provenance.json")["seed_weights_sha256"] == seed["weights_sha256"]
    # Tokens and FLOPs: seed + experts = dense; the report's table has the seed row.
    runs = [read_json(L.expert(k) / "run.json") for k in range(2)]
    dense = read_json(L.dense / "run.json")
    assert seed["tokens"] + sum(r["tokens"] for r in runs) == dense["tokens"]
    assert seed["flops"] + sum(r["flops"] for r in runs) == dense["flops"]
    costs = read_json(L.results)["costs"]
    assert costs["seed_training"] + costs["experts_training"] == costs["dense_training"] == dense["flops"]
    routing = costs["routers_training"] + costs["routers_sharding"] + costs["experts_sharding"]
    assert costs["mixture_training"] - costs["dense_training"] == routing > 0  # beyond dense: the routers' share only
    report = L.report.read_text()
    assert "dense seed, shared by the experts" in report and "seed_fraction 0.5" in report
    assert read_json(L.results)["curves"]["seed"][-1]["step"] == 4
    # The pure run is today's method: no seed, no seed key in its config or provenance.
    assert not P.seed.exists() and "seed_fraction" not in read_json(P.config)
    assert "seed_weights_sha256" not in read_json(P.expert(0) / "provenance.json")


def test_a_pure_run_is_unchanged_by_an_explicit_zero(sharded_run, pure_run, tmp_path):
    run = copy_run(sharded_run, tmp_path / "run")
    lines: list[str] = []
    run_pipeline(fast_config(seed_fraction=0.0), run, until="experts", log=lines.append)
    assert any("seed: not used" in x for x in lines)
    for k in range(2):
        assert _weights(RunLayout(run).expert_model(k)) == _weights(RunLayout(pure_run).expert_model(k))


def test_experts_are_refused_without_the_seed_or_with_another_one(split_run, sharded_run, tmp_path):
    run = split_copy(sharded_run, tmp_path / "fresh")
    cfg = fast_config(seed_fraction=HALF)
    run_pipeline(cfg, run, until="shard", log=lambda m: None)
    with pytest.raises(SmallTalkError, match=r"seed\.json: not found.*--until seed"):
        train_expert(run, 0, cfg=cfg, log=lambda m: None)
    assert not RunLayout(run).expert(0).exists()
    # A seed re-trained (other weights) under finished experts: the bundle stage refuses them.
    done = copy_run(split_run[0], tmp_path / "done")
    L = RunLayout(done)
    seed = read_json(L.seed / "seed.json")
    atomic_write_json(L.seed / "seed.json", {**seed, "weights_sha256": "0" * 64})
    (L.bundle / "bundle.json").unlink()
    with pytest.raises(SmallTalkError, match=r"expert 0 branched from a seed with weights sha256 .* delete"):
        run_pipeline(cfg, done, until="bundle", log=lambda m: None)
    # A seed of another architecture is refused before the expert starts.
    atomic_write_json(L.seed / "seed.json", {**seed, "model": {**seed["model"], "hidden_size": 999}})
    import shutil

    shutil.rmtree(L.expert(1))
    with pytest.raises(SmallTalkError, match=r"architecture differs from the experts' \(hidden_size"):
        train_expert(done, 1, cfg=cfg, log=lambda m: None)


@pytest.mark.parametrize("value, message", [
    ("1", "seed_fraction=1.0 must be a number in \\[0, 1\\)"),
    ("-0.25", "seed_fraction=-0.25 must be a number in \\[0, 1\\)"),
    ("0.3", r"seed_fraction=0.3 does not split the budget into whole steps .* multiple of 1/8, e.g. 0.125, 0.25, 0.375"),
])
def test_bad_seed_fractions_exit_2_and_write_nothing(value, message, tmp_path):
    import re

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(fast_config().to_dict()))
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "smalltalk", "run", "--config", str(config), "--out", str(out),
                           "--seed-fraction", value], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and re.search(message, done.stderr), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not out.exists()


def test_a_killed_split_run_resumes_to_the_same_weights(sharded_run, tmp_path):
    """SIGKILL in the experts stage after a checkpoint; the re-run ends with the weights of an uninterrupted run."""
    cfg = fast_config(seed_fraction=0.25)  # seed 2 steps; experts from step 2, checkpoints at 4 and 8
    reference = split_copy(sharded_run, tmp_path / "reference")
    run_pipeline(cfg, reference, until="experts", log=lambda m: None)
    run = split_copy(sharded_run, tmp_path / "run")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    cmd = [sys.executable, "-m", "smalltalk", "run", "--config", str(config), "--out", str(run), "--threads", "1",
           "--until", "experts"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env,
                            start_new_session=True)
    for line in proc.stderr:
        if "[5/9] experts: running" in line:
            break
    ckpts = RunLayout(run).expert(0) / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not (ckpts / "step_00000004").is_dir():
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (RunLayout(run).expert(1) / "run.json").exists()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "seed: complete, skipped" in done.stderr
    for k in range(2):
        assert _weights(RunLayout(run).expert_model(k)) == _weights(RunLayout(reference).expert_model(k))
    steps = [r["step"] for r in read_metrics(RunLayout(run).expert(0)) if "loss" in r]
    assert steps == list(range(3, 9))


def test_grow_works_on_a_split_bundle(split_run, corpus_dir, tmp_path):
    import gzip

    from smalltalk.mixture.bundle import read_bundle
    from smalltalk.mixture.grow import GrowConfig, grow_bundle

    new = tmp_path / "new"
    new.mkdir()
    with gzip.open(corpus_dir / "train" / "novels_de.jsonl.gz", "rt", encoding="utf-8") as f:
        for i, line in zip(range(4), f):
            (new / f"roman_{i}.txt").write_text(json.loads(line)["text"][:30_000], encoding="utf-8")
    bundle = RunLayout(split_run[0]).bundle
    grown = tmp_path / "grown"
    result = grow_bundle(bundle, [str(new)], grown, GrowConfig(router_steps=10, expert_steps=6, expert_batch_size=4,
                                                               branch_from="nearest", device="cpu"))
    assert read_bundle(grown).num_experts == 3 == result["num_experts"]
    assert [x.weights_sha256 for x in read_bundle(grown).experts[:2]] == \
        [x.weights_sha256 for x in read_bundle(bundle).experts]
