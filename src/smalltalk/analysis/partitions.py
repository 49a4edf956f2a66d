"""Comparing partitions of the same sequences: two routings, or a routing and the domain labels.

Expert indices are arbitrary (expert 2 of one run may be expert 0 of another), so agreement is
measured after the best one-to-one matching of the experts (Hungarian algorithm on the contingency
table), next to the permutation-free adjusted Rand index. NMI measures how much a routing tells
about the domain labels (analysis only: routing never reads domains).
"""

from __future__ import annotations

import numpy as np

from ..errors import SmallTalkError


def _check_pair(a: np.ndarray, b: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    if a.ndim != 1 or a.shape != b.shape:
        raise SmallTalkError(f"{what}: the two labelings must be 1-D and of equal length, got {a.shape} and {b.shape}")
    if len(a) == 0:
        raise SmallTalkError(f"{what}: nothing to compare (no sequences)")
    if a.min() < 0 or b.min() < 0:
        raise SmallTalkError(f"{what}: labels must be non-negative (drop unknown labels first)")
    return a, b


def contingency(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(max(a)+1, max(b)+1) int64 table: [i, j] = number of sequences with a == i and b == j."""
    a, b = _check_pair(a, b, "contingency")
    table = np.zeros((int(a.max()) + 1, int(b.max()) + 1), dtype=np.int64)
    np.add.at(table, (a, b), 1)
    return table


def best_matching(a: np.ndarray, b: np.ndarray) -> tuple[float, dict[int, int]]:
    """Fraction of sequences on which `a` and `b` agree after the best one-to-one relabeling of `b`,
    and that relabeling {label of b: label of a}."""
    from scipy.optimize import linear_sum_assignment

    table = contingency(a, b)  # (Ka, Kb)
    rows, cols = linear_sum_assignment(table, maximize=True)
    return float(table[rows, cols].sum() / len(np.asarray(a))), {int(c): int(r) for r, c in zip(rows, cols)}


def adjusted_rand(a: np.ndarray, b: np.ndarray) -> float:
    from sklearn.metrics import adjusted_rand_score

    a, b = _check_pair(a, b, "adjusted Rand")
    return float(adjusted_rand_score(a, b))


def nmi(a: np.ndarray, b: np.ndarray) -> float:
    """Normalized mutual information (arithmetic normalisation, as scikit-learn's default)."""
    from sklearn.metrics import normalized_mutual_info_score

    a, b = _check_pair(a, b, "NMI")
    return float(normalized_mutual_info_score(a, b))


def compare_partitions(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Agreement after matching, adjusted Rand and NMI of two routings of the same sequences."""
    agreement, _ = best_matching(a, b)
    return {"agreement": agreement, "adjusted_rand": adjusted_rand(a, b), "nmi": nmi(a, b)}
