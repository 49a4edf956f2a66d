"""TF-IDF routing baseline: fit on real corpus text, exact balanced clusters that follow the domains,
transform parity with scikit-learn, save/load, decoding token prefixes, shards in the sharding format,
and clear errors on bad input."""

from __future__ import annotations

import numpy as np
import pytest

from analysis_run import corpus_prefixes
from smalltalk.analysis.derived import write_partition_shards
from smalltalk.analysis.partitions import best_matching, compare_partitions, contingency, nmi
from smalltalk.analysis.tfidf import TfidfConfig, TfidfRouter, decode_prefixes, fit_tfidf_router
from smalltalk.data.shards import TokenDataset
from smalltalk.errors import SmallTalkError
from smalltalk.routing.assign import default_capacities, random_balanced_assignment


@pytest.fixture(scope="module")
def corpus_texts(corpus_dir):
    return corpus_prefixes(corpus_dir, chars=600, per_domain=50)


def test_fit_balanced_clusters_follow_domains(corpus_texts, tmp_path):
    texts, domains = corpus_texts
    router, clustering = fit_tfidf_router(texts, TfidfConfig(num_clusters=4, svd_dim=32, n_init=1, seed=0))
    np.testing.assert_array_equal(np.bincount(clustering.labels), default_capacities(len(texts), 4))
    # Ten domains in four clusters: far more informative than chance (a random partition scores ~0.01).
    assert nmi(clustering.labels, domains) > 0.35
    assert nmi(random_balanced_assignment(len(texts), 4, 0), domains) < 0.05
    # Inference has no capacities, yet nearly every training text goes back to its own cluster.
    assert (router.route(texts) == clustering.labels).mean() > 0.9

    from sklearn.feature_extraction.text import TfidfVectorizer

    reference = TfidfVectorizer(sublinear_tf=True, min_df=2).fit(texts)
    assert abs(reference.transform(texts) - router.tfidf(texts)).max() < 1e-12

    router.save(tmp_path / "router")
    loaded = TfidfRouter.load(tmp_path / "router")
    np.testing.assert_array_equal(loaded.route(texts), router.route(texts))
    np.testing.assert_allclose(loaded.features(texts[:5]), router.features(texts[:5]))

    again, clustering2 = fit_tfidf_router(texts, TfidfConfig(num_clusters=4, svd_dim=32, n_init=1, seed=0))
    np.testing.assert_array_equal(clustering2.labels, clustering.labels)  # a seed fixes everything


def test_bad_input_is_a_clear_error(corpus_texts, tmp_path):
    texts, _ = corpus_texts
    with pytest.raises(SmallTalkError, match="empty vocabulary"):
        fit_tfidf_router(["a b c", "!!! ??", "x"], TfidfConfig(num_clusters=2))
    with pytest.raises(SmallTalkError, match="5 clusters but only 3 sequences"):
        fit_tfidf_router(texts[:3], TfidfConfig(num_clusters=5))
    with pytest.raises(SmallTalkError, match="svd_dim=0"):
        TfidfConfig(svd_dim=0)
    with pytest.raises(SmallTalkError, match="not found"):
        TfidfRouter.load(tmp_path / "nothing")


def test_partition_metrics():
    a = np.array([0, 0, 1, 1, 2, 2, 2, 0])
    relabeled = np.array([2, 0, 1])[a]  # the same partition with other expert indices
    assert compare_partitions(a, relabeled) == pytest.approx({"agreement": 1.0, "adjusted_rand": 1.0, "nmi": 1.0})
    b = np.array([1, 1, 0, 0, 2, 2, 0, 0])
    agreement, mapping = best_matching(a, b)
    assert agreement == pytest.approx(6 / 8)  # b's 1 -> 0, 0 -> 1, 2 -> 2; the last two sequences differ
    assert mapping == {1: 0, 0: 1, 2: 2}
    np.testing.assert_array_equal(contingency(a, b), [[1, 2, 0], [2, 0, 0], [1, 0, 2]])
    with pytest.raises(SmallTalkError, match="equal length"):
        best_matching(a, b[:3])


def test_prefix_text_and_partition_shards(tiny_data, tmp_path):
    from smalltalk.data.splits import load_split

    ds = load_split(tiny_data, "train").dataset
    tokens = ds.get(np.arange(40))
    texts = decode_prefixes(tiny_data / "tokenizer.json", tokens, 32)
    assert len(texts) == 40 and all(isinstance(t, str) for t in texts)
    assert sum(len(t) for t in texts) > 40 * 32  # byte-level BPE: several characters per token
    full = decode_prefixes(tiny_data / "tokenizer.json", tokens[:1], ds.seq_len)[0]
    assert full.startswith(texts[0])
    with pytest.raises(SmallTalkError, match="prefix_len=0 must be a positive integer"):
        decode_prefixes(tiny_data / "tokenizer.json", tokens, 0)
    with pytest.raises(SmallTalkError, match=f"longer than the seq_len \\({ds.seq_len}\\)"):
        decode_prefixes(tiny_data / "tokenizer.json", tokens, ds.seq_len + 1)

    # Any partition becomes expert shards in the sharding stage's format: per-expert prepared-data dirs.
    assignment = random_balanced_assignment(len(ds), 3, seed=0)
    manifest = write_partition_shards(tiny_data, assignment, tmp_path / "shards", 3, prefix_len=32,
                                      method={"method": "random"})
    assert manifest["format"] == "smalltalk-expert-shards" and manifest["num_experts"] == 3
    assert manifest["splits"]["train"]["counts"] == np.bincount(assignment).tolist()
    for e in range(3):
        part = load_split(tmp_path / "shards" / f"expert_{e}", "train").dataset
        sel = np.flatnonzero(assignment == e)
        assert len(part) == len(sel)
        np.testing.assert_array_equal(part.get(np.arange(len(part))), ds.get(sel))  # original order kept
        np.testing.assert_array_equal(part.domains(), ds.domains(sel))
    stored = np.load(tmp_path / "shards" / "work" / "train_assign_000000.npy")
    np.testing.assert_array_equal(stored, assignment)
    assert isinstance(TokenDataset.from_dir(tmp_path / "shards" / "expert_0" / "train"), TokenDataset)
    with pytest.raises(SmallTalkError, match="without data"):
        write_partition_shards(tiny_data, np.zeros(len(ds), dtype=np.int64), tmp_path / "bad", 2, prefix_len=32,
                               method={})
