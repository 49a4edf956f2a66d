"""`smalltalk run` end to end on real data with a fast config: every stage, the report, skipping complete
stages, and refusing a config that does not match the run directory (resuming a killed run:
test_pipeline_resume.py; the ways to run experts: test_pipeline_experts.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from smalltalk.data.shards import TokenDataset, write_shard
from smalltalk.errors import SmallTalkError
from smalltalk.io import atomic_write_json, read_json
from smalltalk.run.config import RunConfig
from smalltalk.run.experts import train_expert
from smalltalk.run.layout import RunLayout
from smalltalk.run.pipeline import STAGES, run_pipeline

FAST = {
    "preset": "tiny", "name": "test", "num_experts": 2, "prefix_len": 16, "valid_seqs": 96, "device": "cpu",
    "routers": {"iterations": 2, "steps_per_iteration": 4, "batch_size": 8, "heldout_seqs": 16},
    "expert_train": {"max_steps": 8, "batch_size": 4, "warmup_steps": 2, "eval_every": 4, "eval_batches": 1,
                     "checkpoint_every": 4},
    "eval": {"max_seqs": 32, "prefix_lens": [4, 8]},
}


def fast_config(**overrides) -> RunConfig:
    return RunConfig.from_dict({**FAST, **overrides})


def small_data(tiny_data: Path, out: Path, sizes=(("train", 900), ("valid", 300), ("test", 120))) -> Path:
    """An evenly spaced subset of the prepared `tiny` dataset (real text, every domain), so a test run is fast."""
    manifest = read_json(tiny_data / "manifest.json")
    out.mkdir(parents=True)
    shutil.copyfile(tiny_data / "tokenizer.json", out / "tokenizer.json")
    for split, n in sizes:
        ds = TokenDataset.from_dir(tiny_data / split)
        idx = np.unique(np.linspace(0, len(ds) - 1, n).round().astype(np.int64))
        write_shard(out / split / "shard_00000.bin", ds.get(idx), ds.domains(idx), ds.vocab_size)
        info = manifest["splits"][split]
        info.update(shards=[{"file": f"{split}/shard_00000.bin", "num_seqs": len(idx)}], num_seqs=len(idx),
                    num_tokens=len(idx) * ds.seq_len, num_bytes=int(info["num_bytes"] * len(idx) / len(ds)))
    atomic_write_json(out / "manifest.json", manifest)
    return out


@pytest.fixture(scope="module")
def sharded_run(tiny_data, tmp_path_factory) -> Path:
    """A run directory after prepare (a subset of tiny_data), router EM and sharding."""
    run = tmp_path_factory.mktemp("pipeline") / "run"
    small_data(tiny_data, RunLayout(run).data)
    run_pipeline(fast_config(), run, until="shard", log=lambda m: None)
    return run


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_full_run_writes_the_report_and_skips_complete_stages(sharded_run, tmp_path):
    run = copy_run(sharded_run, tmp_path / "run")
    lines: list[str] = []
    run_pipeline(fast_config(), run, log=lines.append)
    assert any("[1/9] prepare: complete, skipped" in x for x in lines)
    assert any("[5/9] experts: done" in x for x in lines)
    L = RunLayout(run)
    results = read_json(L.results)
    ev, costs = results["eval"], results["costs"]
    assert ev["num_seqs"] == 32 and ev["num_experts"] == 2 and ev["num_tokens"] == 32 * 127
    assert 1 < ev["mixture"]["ppl"] < 2048 and 1 < ev["dense"]["ppl"] < 2048
    assert ev["improvement_pct"] == pytest.approx(100 * (1 - ev["mixture"]["ppl"] / ev["dense"]["ppl"]))
    assert sum(r["num_seqs"] for r in ev["per_expert"]) == 32
    assert [s["prefix_len"] for s in ev["prefix_sweep"]] == [4, 8, 16]
    # Equal training tokens: the dense model's FLOPs equal the experts' (Eq. 10 vs Eq. 15).
    assert costs["dense_training"] == costs["experts_training"] > 0
    assert costs["training_overhead_pct"] > 0 and costs["inference_overhead_pct"] > 0
    dense_run, expert_run = read_json(L.dense / "run.json"), read_json(L.expert(0) / "run.json")
    assert dense_run["tokens"] == 2 * expert_run["tokens"] and dense_run["step"] == expert_run["step"] == 8
    assert dense_run["flops"] == 2 * expert_run["flops"]
    assert [p["step"] for p in results["curves"]["mixture"]] == [4, 8] == [p["step"] for p in results["curves"]["dense"]]
    report = L.report.read_text()
    for heading in ("## Test perplexity", "## Experts specialise", "## Cost (cf. Table 3)",
                    "## Routing prefix length", "## Where each domain is routed", "## Plots"):
        assert heading in report
    for name in ("ppl_vs_flops.png", "per_expert.png", "prefix_sweep.png"):
        png = run / "plots" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"plots/{name}" in report
    assert (L.bundle / "bundle.json").is_file()
    # Everything complete: a second run only re-renders the report, keeping sections other tools added.
    L.report.write_text(report + "\n<!-- downstream -->\n## Downstream\nkept\n<!-- /downstream -->\n")
    lines.clear()
    run_pipeline(fast_config(), run, log=lines.append)
    skipped = [s for s in STAGES if any(f"] {s}: complete, skipped" in x for x in lines)]
    assert skipped == [s for s in STAGES[:-1] if s != "seed"]  # seed: not used by a pure mixture
    assert L.report.read_text().count("<!-- downstream -->\n## Downstream\nkept\n<!-- /downstream -->") == 1
    # A changed eval section re-runs only the evaluation.
    lines.clear()
    run_pipeline(fast_config(eval={"max_seqs": 16, "prefix_lens": [4]}), run, log=lines.append)
    assert any("[8/9] evaluate: done" in x for x in lines) and read_json(L.eval_results)["num_seqs"] == 16


def test_a_config_that_changes_finished_work_is_refused(sharded_run, tmp_path):
    run = copy_run(sharded_run, tmp_path / "run")
    with pytest.raises(SmallTalkError, match=r"num_experts: 2 -> 3"):
        run_pipeline(fast_config(num_experts=3), run)
    with pytest.raises(SmallTalkError, match=r"expert_train.max_steps: 8 -> 9"):
        run_pipeline(fast_config(expert_train={**FAST["expert_train"], "max_steps": 9}), run)
    with pytest.raises(SmallTalkError, match="--until 'nope'"):
        run_pipeline(fast_config(), run, until="nope")


def test_num_experts_not_matching_the_shards_is_refused(sharded_run, tmp_path):
    run = copy_run(sharded_run, tmp_path / "run")
    with pytest.raises(SmallTalkError, match="sharded for num_experts=2 but the run config says num_experts=3"):
        train_expert(run, 0, cfg=fast_config(num_experts=3))
    with pytest.raises(SmallTalkError, match="--expert 2: the run has experts 0..1"):
        train_expert(run, 2)
    shutil.rmtree(RunLayout(run).expert_shard(1))
    with pytest.raises(SmallTalkError, match="expert 1 has no training shard"):
        train_expert(run, 1)
    assert not RunLayout(run).expert(1).exists()  # nothing written for a refused expert


def test_domains_restrict_the_corpus_keeping_its_splits(corpus_dir, tmp_path):
    from smalltalk.run.pipeline import corpus_view

    cfg = fast_config(domains=["code_python", "novels_fr"], data={"preset": "tiny", "corpus": [str(corpus_dir)]})
    (view,) = corpus_view(RunLayout(tmp_path / "run"), cfg)
    for split in ("train", "valid", "test"):
        files = sorted(p.name for p in (Path(view) / split).iterdir())
        assert files == ["code_python.jsonl.gz", "novels_fr.jsonl.gz"]
        assert (Path(view) / split / files[0]).resolve() == (corpus_dir / split / files[0]).resolve()
    assert corpus_view(RunLayout(tmp_path / "other"), fast_config()) == ()  # no domains: the whole corpus
    with pytest.raises(SmallTalkError, match="no file for domain 'klingon'"):
        corpus_view(RunLayout(tmp_path / "bad"), fast_config(domains=["klingon"],
                                                             data={"preset": "tiny", "corpus": [str(corpus_dir)]}))
