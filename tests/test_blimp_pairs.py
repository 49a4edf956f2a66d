"""`benchmarks/blimp_pairs.py` scores BLiMP as lm-eval does: its per-sentence-routed mixture accuracy and its dense
accuracy equal lm-eval's on the same pairs, and its split / unsplit counts and pair routing add up."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lm_eval import simple_evaluate  # noqa: E402

from smalltalk.evaluation.backend import open_models
from smalltalk.mixture.models import Models  # noqa: E402
from smalltalk.evaluation.downstream import task_manager  # noqa: E402
from smalltalk.evaluation.lm_eval_model import SmallTalkLM  # noqa: E402
from smalltalk.evaluation.task_data import read_jsonl_gz, resolve_evals_dir  # noqa: E402

from benchmark_import import import_benchmark  # noqa: E402

PARADIGM = "determiner_noun_agreement_1"
PAIRS = 120


@pytest.fixture(scope="module")
def blimp_pairs():
    return import_benchmark("blimp_pairs")


def lm_eval_run(**model) -> tuple[float, np.ndarray]:
    """lm-eval's accuracy on the first PAIRS pairs, and its (PAIRS, 2) log-likelihoods (good, bad)."""
    task = f"blimp_offline_{PARADIGM}"
    out = simple_evaluate(model=SmallTalkLM(batch_size=32, device="cpu", **model), tasks=[task], limit=PAIRS,
                          task_manager=task_manager(), log_samples=True)
    samples = sorted(out["samples"][task], key=lambda x: x["doc_id"])
    loglik = np.array([[float(r[0]) for r in x["filtered_resps"]] for x in samples])
    return out["results"][task]["acc,none"], loglik


@pytest.fixture(scope="module")
def lm_eval_mixture(tiny_mixture) -> tuple[float, np.ndarray]:
    return lm_eval_run(bundle=str(tiny_mixture["bundle"]))


def test_sentences_scored_as_lm_eval_scores_them(blimp_pairs, tiny_mixture, lm_eval_mixture):
    """Same tokens, same routing, same expert: the same log-likelihood for every sentence."""
    pairs = read_jsonl_gz(resolve_evals_dir() / "blimp" / f"{PARADIGM}.jsonl.gz", ())[:PAIRS]
    mix = open_models(bundle=tiny_mixture["bundle"], device="cpu", max_loaded_experts=2)
    ours = []
    for ids in blimp_pairs.pair_tokens(mix.mixture.encode, pairs):  # good, then bad
        experts = np.array([r.expert for r in mix.route(ids)])
        logp = np.stack([blimp_pairs.sentence_logprobs(mix.expert(e), mix.eos_id, ids, mix.max_len)
                         for e in range(mix.num_experts)], 1)  # (PAIRS, E)
        ours.append(logp[np.arange(PAIRS), experts])
    _, theirs = lm_eval_mixture
    np.testing.assert_allclose(np.stack(ours, 1), theirs, rtol=1e-4, atol=1e-3)


def test_blimp_pairs_matches_lm_eval(blimp_pairs, tiny_mixture, lm_eval_mixture, tmp_path):
    assert blimp_pairs.main(["--bundle", str(tiny_mixture["bundle"]), "--dense", str(tiny_mixture["dense"]),
                             "--paradigms", PARADIGM, "--limit", str(PAIRS), "--threads", "1",
                             "--results", str(tmp_path), "--name", "bp"]) == 0
    report = json.loads((tmp_path / "bp.json").read_text(encoding="utf-8"))
    row = report["paradigms"][PARADIGM]
    assert row["pairs"] == PAIRS
    # Same requests, same routing, same experts: the accuracies are lm-eval's (one pair of slack for a
    # near-tie that batching rounds the other way).
    assert row["mixture"][0] == pytest.approx(lm_eval_mixture[0], abs=1 / PAIRS)
    assert row["dense"][0] == pytest.approx(lm_eval_run(model=str(tiny_mixture["dense"]))[0], abs=1 / PAIRS)

    split = row["split_pairs"]
    assert row["split_share"] == pytest.approx(split / PAIRS)
    if 0 < split < PAIRS:  # the two subsets' accuracies recombine into the whole
        whole = (row["mixture_split"][0] * split + row["mixture_unsplit"][0] * (PAIRS - split)) / PAIRS
        assert whole == pytest.approx(row["mixture"][0])
    s = report["summary"]
    assert s["pairs"] == PAIRS and s["mixture"] == pytest.approx(row["mixture"][0])
    assert 0.0 <= s["mixture_pair_routed"] <= 1.0
    md = (tmp_path / "bp.md").read_text(encoding="utf-8")
    assert f"| {PARADIGM} |" in md and f"{s['dense']:.4f}" in md


def test_blimp_pairs_needs_models(blimp_pairs):
    with pytest.raises(SystemExit) as e:
        blimp_pairs.main(["--bundle", "x"])
    assert e.value.code == 2
