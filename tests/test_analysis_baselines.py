"""TF-IDF and random-shard baselines on a real (tiny) finished run: partitions written as expert shards,
experts trained by the run's own expert trainer at the same budget, routed at inference by nearest centroid /
by the experts themselves, and compared with the run's EM mixture and dense model."""

from __future__ import annotations

import math

import numpy as np
import pytest

from analysis_run import EVAL_SEQS, build_tiny_run
from smalltalk.analysis.baselines import EM_LABEL, BaselineConfig
from smalltalk.analysis.random_shards import LABEL as RANDOM_LABEL
from smalltalk.analysis.random_shards import analyze_random_shards
from smalltalk.analysis.runs import open_run
from smalltalk.analysis.tfidf import TfidfRouter
from smalltalk.analysis.tfidf_baseline import LABEL as TFIDF_LABEL
from smalltalk.analysis.tfidf_baseline import TfidfBaselineConfig, analyze_tfidf, prefix_texts
from smalltalk.errors import SmallTalkError
from smalltalk.io import read_json
from smalltalk.routing.assign import default_capacities


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, corpus_dir):
    return build_tiny_run(tmp_path_factory, corpus_dir)


def rows_of(result, method):
    return {r["prefix_len"]: r for r in result["rows"] if r["method"] == method}


def check_derived_experts(derived: str, run_dir):
    """Same budget as the run's experts: same steps and batch, from the run's own config."""
    for k in range(4):
        mine = read_json(f"{derived}/experts/expert_{k}/run.json")
        theirs = read_json(run_dir / "experts" / f"expert_{k}" / "run.json")
        assert mine["step"] == theirs["step"] == 6
        assert mine["train"]["batch_size"] == theirs["train"]["batch_size"]
        assert mine["tokens"] == theirs["tokens"]


def test_tfidf_baseline(run_dir):
    cfg = TfidfBaselineConfig(prefix_lens=[8, 32], max_seqs=EVAL_SEQS, device="cpu",
                              tfidf={"svd_dim": 16, "n_init": 1})
    result = analyze_tfidf(run_dir, cfg)
    view = open_run(run_dir)
    num_train = read_json(run_dir / "data" / "manifest.json")["splits"]["train"]["num_seqs"]
    part = result["partition"]
    assert part["cluster_sizes"] == default_capacities(num_train, 4).tolist()  # exact, balanced
    shards = read_json(f"{result['derived_run']}/shards/manifest.json")
    assert shards["splits"]["train"]["counts"] == part["cluster_sizes"]
    assert 0.0 <= part["agreement_with_em"] <= 1.0 and part["nmi_domain_tfidf"] > 0.1
    check_derived_experts(result["derived_run"], run_dir)

    em, tf = rows_of(result, EM_LABEL), rows_of(result, TFIDF_LABEL)
    assert sorted(em) == sorted(tf) == [8, 32]
    ev = read_json(run_dir / "eval" / "results.json")
    assert em[32]["ppl"] == pytest.approx(ev["mixture"]["ppl"], rel=1e-5)
    assert all(math.isfinite(r["ppl"]) and r["dense_ppl"] == pytest.approx(ev["dense"]["ppl"], rel=1e-5)
               for r in tf.values())
    # The saved router reproduces the routing the analysis used.
    router = TfidfRouter.load(run_dir / "analysis" / "tfidf" / "router")
    texts = prefix_texts(view, "test", 32, np.arange(5))
    assert router.route(texts).shape == (5,) and router.num_clusters == 4
    section = (run_dir / "analysis" / "tfidf" / "section.md").read_text()
    assert "M-hat = 32: EM" in section and "tfidf.png" in section

    again = analyze_tfidf(run_dir, TfidfBaselineConfig(prefix_lens=[8, 32], max_seqs=EVAL_SEQS, device="cpu",
                                                       tfidf={"svd_dim": 16, "n_init": 1}, train=False))
    assert [r["ppl"] for r in again["rows"]] == [r["ppl"] for r in result["rows"]]  # deterministic, reused

    with pytest.raises(SmallTalkError, match="must be >= 2"):
        analyze_tfidf(run_dir, TfidfBaselineConfig(prefix_lens=[0], max_seqs=8, device="cpu"))


def test_random_shards(run_dir):
    result = analyze_random_shards(run_dir, BaselineConfig(prefix_lens=[8, 32], max_seqs=EVAL_SEQS, device="cpu"))
    num_train = read_json(run_dir / "data" / "manifest.json")["splits"]["train"]["num_seqs"]
    assert result["train_counts"] == default_capacities(num_train, 4).tolist()
    check_derived_experts(result["derived_run"], run_dir)
    rnd = rows_of(result, RANDOM_LABEL)
    assert sorted(rnd) == [8, 32] and all(math.isfinite(r["ppl"]) for r in rnd.values())
    no_routing = next(r for r in result["rows"] if r["method"].endswith("(no routing)"))
    # Experts routing for themselves can only pick a better expert than a random pick, on average.
    assert rnd[32]["ppl"] < no_routing["ppl"]
    # Random shards carry no domain structure: the partition is balanced and unrelated to domains.
    from smalltalk.analysis.partitions import nmi
    from smalltalk.data.splits import load_split

    assign = np.load(f"{result['derived_run']}/shards/work/train_assign_000000.npy")
    assert nmi(assign, load_split(run_dir / "data", "train").dataset.domains()) < 0.02
    assert (run_dir / "analysis" / "random-shards" / "random-shards.png").is_file()
