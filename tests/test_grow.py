"""`smalltalk grow`: a new router and expert for new data; the old models are untouched."""

from __future__ import annotations

import gzip
import json

import pytest

from analysis_run import build_tiny_run
from smalltalk.cli import main
from smalltalk.errors import SmallTalkError
from smalltalk.mixture.bundle import read_bundle
from smalltalk.mixture.grow import GrowConfig, grow_bundle
from smalltalk.mixture.inference import Mixture
from smalltalk.model.io import sha256_file

FAST = GrowConfig(router_steps=30, expert_steps=20, expert_batch_size=8, device="cpu")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, corpus_dir):
    return build_tiny_run(tmp_path_factory, corpus_dir)


@pytest.fixture(scope="module")
def new_text(corpus_dir, tmp_path_factory):
    """German novels as plain text files (the tiny run saw them too, but only 48 KB of each file)."""
    root = tmp_path_factory.mktemp("new_text")
    with gzip.open(corpus_dir / "train" / "novels_de.jsonl.gz", "rt", encoding="utf-8") as f:
        for i, line in zip(range(6), f):
            (root / f"roman_{i}.txt").write_text(json.loads(line)["text"][:40_000], encoding="utf-8")
    return root


def _hashes(root):
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def test_grow_adds_one_router_and_expert_and_changes_nothing_else(run_dir, new_text, tmp_path):
    bundle = run_dir / "bundle"
    before = _hashes(bundle)
    result = grow_bundle(bundle, [str(new_text)], tmp_path / "grown", FAST)
    assert _hashes(bundle) == before
    old, new = read_bundle(bundle), read_bundle(tmp_path / "grown")
    assert new.num_experts == old.num_experts + 1 == result["num_experts"]
    assert [x.weights_sha256 for x in new.experts[:-1]] == [x.weights_sha256 for x in old.experts]
    assert [x.weights_sha256 for x in new.routers[:-1]] == [x.weights_sha256 for x in old.routers]
    assert new.experts[-1].train_seqs == result["new_train_seqs"] > 0
    flops = result["training_flops"]
    assert 0 < flops["grow"] < flops["retrain_e_plus_1_from_scratch"]
    # The grown mixture routes: old scores are unchanged, the new router adds a fifth score.
    a, b = Mixture.load(bundle), Mixture.load(tmp_path / "grown")
    text = (new_text / "roman_0.txt").read_text()[:500]
    ra, rb = a.route(text), b.route(text)
    assert rb.scores[:-1] == pytest.approx(ra.scores, abs=1e-4) and len(rb.scores) == 5
    assert json.loads((tmp_path / "grown" / "lineage.json").read_text())["added_expert"] == 4


def test_branching_from_an_expert_and_the_cli(run_dir, new_text, tmp_path, capsys):
    assert main(["grow", str(run_dir), "--data", str(new_text), "--out", str(tmp_path / "g"), "--branch-from", "1",
                 "--router-steps", "10", "--expert-steps", "4", "--expert-batch-size", "4", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "% of retraining 5 experts from scratch" in out and "branched from expert 1" in out
    lineage = json.loads((tmp_path / "g" / "lineage.json").read_text())
    assert lineage["branch_from"] == 1
    # The new data's held-out split, routed by the grown bundle: every sequence counted once.
    routing = lineage["new_data_routing"]
    assert len(routing["per_expert"]) == 5 and routing["new_expert_share"] == routing["per_expert"][4] / sum(
        routing["per_expert"])


def test_branching_from_the_nearest_expert_picks_the_router_that_claims_the_new_data(run_dir, new_text, tmp_path):
    import numpy as np

    from smalltalk.data.splits import load_split
    from smalltalk.model.io import WEIGHTS_FILE, load_model_dir
    from smalltalk.routing.rule import route
    from smalltalk.routing.score import score_dataset

    cfg = FAST.replace(branch_from="nearest", expert_steps=1, router_steps=2)
    result = grow_bundle(run_dir / "bundle", [str(new_text)], tmp_path / "g", cfg)
    # The old routers' own argmax over the new training data, counted here independently.
    train = load_split(result["data_dir"], "train")
    old = Mixture.load(run_dir / "bundle")
    idx = np.linspace(0, len(train.dataset) - 1, min(1024, len(train.dataset))).round().astype(np.int64)
    counts = np.bincount(route(score_dataset(old.routers, train.dataset, np.unique(idx), old.info.prefix_len)),
                         minlength=4)
    assert result["branch_from"] == int(counts.argmax())
    # Branched: one step away from its parent, far from a fresh initialisation.
    parent, _ = load_model_dir(old.info.experts[result["branch_from"]].dir)
    child, _ = load_model_dir(tmp_path / "g" / "experts" / "expert_4")
    diff = max((a - b).abs().max().item() for a, b in zip(parent.parameters(), child.parameters()))
    assert 0 < diff < 0.05
    assert result["training_flops"]["grow"] > 0 and (tmp_path / "g" / "experts" / "expert_4" / WEIGHTS_FILE).is_file()


def test_bad_growth_is_refused_and_changes_nothing(run_dir, new_text, tmp_path, corpus_dir):
    bundle = run_dir / "bundle"
    (tmp_path / "taken").mkdir()
    with pytest.raises(SmallTalkError, match="already exists"):
        grow_bundle(bundle, [str(new_text)], tmp_path / "taken", FAST)
    small = tmp_path / "small"
    small.mkdir()
    (small / "a.txt").write_text("Nur ein kurzer Satz.", encoding="utf-8")
    with pytest.raises(SmallTalkError, match="fewer than the 64 a new expert needs"):
        grow_bundle(bundle, [str(small)], tmp_path / "x", FAST)
    with pytest.raises(SmallTalkError, match="branch_from=9"):
        grow_bundle(bundle, [str(new_text)], tmp_path / "y", GrowConfig(branch_from=9))
    with pytest.raises(SmallTalkError, match="branch_from='closest' must be an expert index or 'nearest'"):
        GrowConfig(branch_from="closest")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_the_held_out_domain_experiment_runs_end_to_end_in_smoke_mode(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "benchmarks/grow_experiment.py", "--smoke", "--hold-out", "novels_de",
                           "--runs-dir", str(tmp_path / "runs"), "--results", str(tmp_path), "--threads", "1"],
                          cwd=repo, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads((tmp_path / "grow_experiment_smoke.json").read_text())["rows"][0]
    assert row["held_out"] == "novels_de" and "novels_de" not in json.loads(
        (tmp_path / "runs" / "smoke-without-novels_de" / "run_config.json").read_text())["domains"]
    assert set(row["new_domain"]) >= {"original_mixture", "grown_mixture", "grown_branched", "dense",
                                      "dense_plus_same_extra_flops"}
    assert len(row["new_domain"]["grown_routing"]) >= 1
    # Shares are read off the routing counts: the added expert is index E of the grown bundle.
    E = row["lineage"]["added_expert"]
    assert row["new_domain"]["new_expert_share"] == row["new_domain"]["grown_routing"].get(str(E), 0) / row[
        "new_domain"]["num_seqs"]
    assert 0 <= row["branched_lineage"]["branch_from"] < E
    md = (tmp_path / "grow_experiment_smoke.md").read_text()
    assert "| novels_de |" in md and "Calibration" in md


def test_several_new_experts_split_the_new_data_by_em_among_new_routers_only(run_dir, new_text, tmp_path):
    import numpy as np

    from smalltalk.data.splits import load_split

    bundle = run_dir / "bundle"
    before = _hashes(bundle)
    result = grow_bundle(bundle, [str(new_text)], tmp_path / "g2",
                         FAST.replace(new_experts=2, router_steps=12, expert_steps=4, min_train_seqs=8))
    assert _hashes(bundle) == before
    new, old = read_bundle(tmp_path / "g2"), read_bundle(bundle)
    assert new.num_experts == 6 and result["added_experts"] == [4, 5]
    assert [x.weights_sha256 for x in new.routers[:4]] == [x.weights_sha256 for x in old.routers]
    # The two new experts trained on disjoint shards that cover the new training data, balanced within it.
    shards = [load_split(tmp_path / "g2.grow-work" / "shards" / f"expert_{k}", "train").dataset for k in range(2)]
    sizes = [len(d) for d in shards]
    assert sum(sizes) == result["new_train_seqs"] and abs(sizes[0] - sizes[1]) <= 2
    assert [new.experts[k].train_seqs for k in (4, 5)] == sizes
    rows = [{d.get(np.arange(len(d)))[i].tobytes() for i in range(len(d))} for d in shards]
    assert not rows[0] & rows[1]
    em = json.loads((tmp_path / "g2.grow-work" / "em" / "routers" / "manifest.json").read_text())
    assert em["num_experts"] == 2 and em["prefix_len"] == old.prefix_len
    routing = result["new_data_routing"]
    assert routing["new_expert_share"] == sum(routing["per_expert"][4:]) / sum(routing["per_expert"])
    with pytest.raises(SmallTalkError, match=r"fewer than the 1000 that 2 new experts need \(500 each\)"):
        grow_bundle(bundle, [str(new_text)], tmp_path / "g3", FAST.replace(new_experts=2, min_train_seqs=500))
    assert not (tmp_path / "g3").exists()


def test_new_data_prepared_with_another_tokenizer_is_refused(run_dir, new_text, tmp_path):
    from smalltalk.data.prepare import prepare
    from smalltalk.data.prepare_config import PrepareConfig

    bundle = run_dir / "bundle"
    before = _hashes(bundle)
    other = tmp_path / "other"
    prepare(PrepareConfig(corpus=(str(new_text),), out_dir=str(other), vocab_size=300, seq_len=128, progress=False,
                          num_workers=1), log=lambda m: None)
    with pytest.raises(SmallTalkError, match=r"prepared with tokenizer [0-9a-f]{12}, the bundle uses [0-9a-f]{12}"):
        grow_bundle(bundle, [str(other)], tmp_path / "g", FAST)
    assert not (tmp_path / "g").exists() and _hashes(bundle) == before
