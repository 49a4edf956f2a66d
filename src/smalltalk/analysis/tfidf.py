"""TF-IDF routing baseline (paper §3.4, Figure 4c; the c-BTM recipe of Gururangan et al. 2023).

    text of each sequence's first M tokens
      -> TF-IDF (scikit-learn; sublinear tf, l2-normalised rows)
      -> truncated SVD to `svd_dim` dimensions, rows l2-normalised again (so Euclidean k-means
         compares directions, like cosine similarity)
      -> balanced k-means into E clusters of exactly the default capacities (`analysis.kmeans`)

The clusters play the role of EM's final balanced assignment: they become the experts' shards. At
inference a prompt goes to the nearest centroid of its prefix text (no capacities, as for EM).

The fitted router is saved as ``tfidf_router.json`` (config, vocabulary, idf) and
``tfidf_router.npz`` (SVD components, centroids); the transform is re-implemented from those
arrays (a test checks it against scikit-learn's), so no pickles are written or read.
"""

from __future__ import annotations

import dataclasses
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import SmallTalkError
from ..io import atomic_write_bytes, atomic_write_json, read_json
from .kmeans import BalancedKMeansResult, balanced_kmeans, nearest_centroid

ROUTER_JSON = "tfidf_router.json"
ROUTER_NPZ = "tfidf_router.npz"
FORMAT = "smalltalk-tfidf-router"


@dataclass
class TfidfConfig:
    num_clusters: int = 4
    """E: clusters = experts."""
    svd_dim: int = 100
    """Dimensions kept by the truncated SVD (c-BTM uses 100); capped by the vocabulary and data size."""
    max_features: int = 50_000
    """Largest TF-IDF vocabulary (most frequent terms)."""
    min_df: int = 2
    """Ignore terms in fewer sequences than this (hapaxes only add noise to the SVD)."""
    sublinear_tf: bool = True
    """Use 1 + log(tf), as c-BTM."""
    n_init: int = 3
    """Balanced k-means restarts; the lowest within-cluster distance wins."""
    max_iter: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("num_clusters", "svd_dim", "max_features", "min_df", "n_init", "max_iter"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SmallTalkError(f"tfidf config: {key}={value!r} must be a positive integer")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _l2_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)  # all-zero rows (no known term) stay zero


class TfidfRouter:
    """A fitted TF-IDF + SVD projection and E centroids."""

    def __init__(self, config: TfidfConfig, vocabulary: Sequence[str], idf: np.ndarray, components: np.ndarray,
                 centroids: np.ndarray):
        self.config = config
        self.vocabulary = list(vocabulary)
        self.idf = np.asarray(idf, dtype=np.float64)  # (V,)
        self.components = np.asarray(components, dtype=np.float64)  # (d, V)
        self.centroids = np.asarray(centroids, dtype=np.float64)  # (E, d)
        if self.components.shape[1] != len(self.vocabulary) or self.idf.shape != (len(self.vocabulary),):
            raise SmallTalkError(f"tfidf router: vocabulary of {len(self.vocabulary)} terms, idf {self.idf.shape}, "
                                 f"components {self.components.shape} do not match; refit it")
        self._counter = None

    @property
    def num_clusters(self) -> int:
        return len(self.centroids)

    def tfidf(self, texts: Sequence[str]):
        """(N, V) sparse TF-IDF rows, identical to the fitted scikit-learn TfidfVectorizer's transform."""
        from sklearn.feature_extraction.text import CountVectorizer
        from sklearn.preprocessing import normalize

        if self._counter is None:
            self._counter = CountVectorizer(vocabulary={t: i for i, t in enumerate(self.vocabulary)},
                                            dtype=np.float64)
        counts = self._counter.transform(list(texts)).tocsr()  # (N, V)
        if self.config.sublinear_tf:
            counts.data = np.log(counts.data) + 1.0
        counts = counts.multiply(self.idf[None, :]).tocsr()
        return normalize(counts, norm="l2", copy=False)

    def features(self, texts: Sequence[str]) -> np.ndarray:
        """(N, d) float64 l2-normalised SVD features of `texts`."""
        return _l2_rows(np.asarray(self.tfidf(texts) @ self.components.T))

    def route(self, texts: Sequence[str]) -> np.ndarray:
        """(N,) int64 nearest centroid of each text (inference: no capacity constraint)."""
        if len(texts) == 0:
            return np.zeros(0, dtype=np.int64)
        return nearest_centroid(self.features(texts), self.centroids).astype(np.int64)

    # -- persistence ---------------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory)
        buf = io.BytesIO()
        np.savez(buf, idf=self.idf, components=self.components, centroids=self.centroids)
        atomic_write_bytes(directory / ROUTER_NPZ, buf.getvalue())
        atomic_write_json(directory / ROUTER_JSON, {"format": FORMAT, "version": 1, "config": self.config.to_dict(),
                                                    "num_clusters": self.num_clusters,
                                                    "svd_dim": int(self.components.shape[0]),
                                                    "vocabulary": self.vocabulary})
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "TfidfRouter":
        directory = Path(directory)
        meta = read_json(directory / ROUTER_JSON)
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise SmallTalkError(f"{directory / ROUTER_JSON}: not a TF-IDF router file; refit it with "
                                 "`smalltalk analyze tfidf`")
        npz_path = directory / ROUTER_NPZ
        if not npz_path.is_file():
            raise SmallTalkError(f"{npz_path}: file not found; refit with `smalltalk analyze tfidf`")
        with np.load(npz_path) as arrays:
            return cls(TfidfConfig(**meta["config"]), meta["vocabulary"], arrays["idf"], arrays["components"],
                       arrays["centroids"])


def fit_tfidf_router(texts: Sequence[str], config: TfidfConfig) -> tuple[TfidfRouter, BalancedKMeansResult]:
    """Fit TF-IDF, SVD and balanced k-means on `texts`; returns the router and the clustering
    (``result.labels`` is the balanced training partition)."""
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer

    texts = list(texts)
    if len(texts) < config.num_clusters:
        raise SmallTalkError(f"tfidf: {config.num_clusters} clusters but only {len(texts)} sequences; use fewer "
                             "experts or more data")
    # min_df above the number of documents would make scikit-learn raise; cap it.
    vectorizer = TfidfVectorizer(sublinear_tf=config.sublinear_tf, max_features=config.max_features,
                                 min_df=min(config.min_df, len(texts)), dtype=np.float64)
    try:
        vectorizer.fit(texts)
    except ValueError as e:  # "empty vocabulary; perhaps the documents only contain stop words"
        raise SmallTalkError(f"tfidf: cannot fit on these {len(texts)} prefix texts: {e}; the prefixes contain no "
                             "word of 2+ letters (in at least min_df texts): use a longer prefix or lower min_df")
    vocab = sorted(vectorizer.vocabulary_, key=vectorizer.vocabulary_.get)
    identity = np.eye(len(vocab))
    router = TfidfRouter(config, vocab, vectorizer.idf_, identity, np.zeros((config.num_clusters, len(vocab))))
    tfidf = router.tfidf(texts)  # (N, V)
    dim = min(config.svd_dim, len(vocab) - 1, len(texts) - 1)
    if dim >= 1:
        svd = TruncatedSVD(n_components=dim, random_state=config.seed, algorithm="randomized", n_iter=7)
        svd.fit(tfidf)
        router.components = svd.components_.astype(np.float64)  # (d, V)
    clustering = balanced_kmeans(router.features(texts), config.num_clusters, max_iter=config.max_iter,
                                 n_init=config.n_init, seed=config.seed)
    router.centroids = clustering.centroids
    return router, clustering


def decode_prefixes(tokenizer_file: str | os.PathLike, tokens: np.ndarray, prefix_len: int) -> list[str]:
    """Text of the first `prefix_len` tokens of each row of `tokens` (N, S), special tokens dropped."""
    from tokenizers import Tokenizer

    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
        raise SmallTalkError(f"tokens must be (num_seqs, seq_len), got shape {tokens.shape}")
    check_prefix_len(prefix_len, tokens.shape[1])
    tok = Tokenizer.from_file(str(tokenizer_file))
    return tok.decode_batch(tokens[:, :prefix_len].astype(np.int64).tolist(), skip_special_tokens=True)


def check_prefix_len(prefix_len: int, limit: int, what: str = "prefix_len", limit_name: str = "seq_len") -> None:
    """M-hat must be a positive integer no longer than the sequences (or context) it is read from."""
    if isinstance(prefix_len, bool) or not isinstance(prefix_len, (int, np.integer)) or prefix_len < 1:
        raise SmallTalkError(f"{what}={prefix_len!r} must be a positive integer (tokens of the prompt used to route)")
    if prefix_len > limit:
        raise SmallTalkError(f"{what}={prefix_len} is longer than the {limit_name} ({limit}); use at most {limit}")
