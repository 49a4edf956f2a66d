"""Balanced k-means: k-means whose clusters have exactly prescribed sizes (the c-BTM clustering,
Gururangan et al. 2023, used by the paper's TF-IDF baseline, §3.4).

Lloyd iterations with a capacity-constrained assignment step::

    assignment  labels minimising sum_i ||x_i - c_{label_i}||^2  s.t.  |cluster k| == capacities[k]
    update      c_k = mean of the points labelled k

Each step can only lower the objective (the assignment is the exact optimum for the centroids, the
means are the exact optimum for the labels), so the loop stops when the labels stop changing.

Exact assignment. With sizes fixed the assignment is a transportation problem (N unit supplies, K
sinks). A feasible assignment is optimal iff its residual graph has no negative cycle; every simple
residual cycle moves one point out of each cluster it visits, so it is enough to look at the graph
on the K clusters whose edge k -> l costs the cheapest move of a point of k into l,
``min_{i in k} d(i, l) - d(i, k)``. We start from the greedy balanced assignment
(`routing.assign.balanced_assignment` on negative distances; warm-started from the previous labels
in later iterations), cancel 2-cycles in batches (pair the best moves k -> l with the best moves
l -> k while a pair still gains), and longer cycles found by Bellman-Ford on the K nodes (also in
batched rounds, see `_cancel_cycle`). When Bellman-Ford finds no negative cycle the assignment is
optimal: a certificate, not a heuristic. An LP solver (scipy HiGHS) took ~60 s per assignment step at
N = 20k, K = 4 here; this takes ~1 s at N = 20k, K = 16 from a k-means++ start (the hardest step),
less when warm-started.

Everything is deterministic: k-means++ seeding draws from ``numpy.random.default_rng(seed)``, ties
go to the lower index, and there is no other randomness.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import SmallTalkError
from ..routing.assign import balanced_assignment, default_capacities


@dataclass
class BalancedKMeansResult:
    centroids: np.ndarray
    """(K, d) float64 cluster means."""
    labels: np.ndarray
    """(N,) int64 cluster of each point; cluster k holds exactly capacities[k] points."""
    inertia: float
    """Sum of squared distances of the points to their centroids."""
    iterations: int
    converged: bool
    """True when the labels stopped changing before max_iter."""


def check_clustering_input(num_points: int, num_clusters: int, what: str = "points") -> None:
    if not isinstance(num_clusters, (int, np.integer)) or num_clusters < 1:
        raise SmallTalkError(f"balanced k-means: num_clusters={num_clusters!r} must be a positive integer")
    if num_clusters > num_points:
        raise SmallTalkError(f"balanced k-means: {num_clusters} clusters but only {num_points} {what}; every "
                             "cluster needs at least one: use fewer experts or more data")


def squared_distances(points: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """(N, d), (K, d) -> (N, K) squared Euclidean distances (clipped at 0 against rounding)."""
    d2 = (points * points).sum(1)[:, None] - 2.0 * points @ centroids.T + (centroids * centroids).sum(1)[None, :]
    return np.maximum(d2, 0.0)


def _cheapest_moves(cost: np.ndarray, labels: np.ndarray, K: int) -> tuple[np.ndarray, np.ndarray]:
    """W (K, K): cheapest cost change of moving one point of cluster k to l; who (K, K): that point."""
    own = cost[np.arange(len(labels)), labels]  # (N,)
    delta = cost - own[:, None]  # (N, K) cost change of moving i to each cluster
    W = np.full((K, K), np.inf)
    who = np.full((K, K), -1, dtype=np.int64)
    for k in range(K):
        members = np.flatnonzero(labels == k)
        if len(members):
            best = delta[members].argmin(axis=0)  # (K,) first minimum: lowest point index wins ties
            W[k] = delta[members[best], np.arange(K)]
            who[k] = members[best]
    np.fill_diagonal(W, np.inf)
    return W, who


def _swap_pairs(cost: np.ndarray, labels: np.ndarray, K: int, tol: float) -> int:
    """Cancel all profitable 2-cycles, in batches; returns the number of points moved."""
    members = [np.flatnonzero(labels == k) for k in range(K)]
    moved = 0
    for k in range(K):
        for l in range(k + 1, K):
            in_k, in_l = members[k], members[l]
            gain_kl = cost[in_k, l] - cost[in_k, k]  # cost change of moving each point of k to l
            gain_lk = cost[in_l, k] - cost[in_l, l]
            if gain_kl.min() + gain_lk.min() >= -tol:
                continue  # the best pair does not gain: skip the sorting (the common case)
            ok, ol = np.argsort(gain_kl, kind="stable"), np.argsort(gain_lk, kind="stable")
            n = min(len(ok), len(ol))
            pair = gain_kl[ok[:n]] + gain_lk[ol[:n]]  # increasing: the best pairs come first
            count = int(np.searchsorted(pair, -tol, side="left"))  # pairs whose swap gains more than tol
            to_l, to_k = in_k[ok[:count]], in_l[ol[:count]]
            labels[to_l], labels[to_k] = l, k
            members[k] = np.sort(np.concatenate([in_k[ok[count:]], to_k]))
            members[l] = np.sort(np.concatenate([in_l[ol[count:]], to_l]))
            moved += 2 * count
    return moved


def _negative_cycle(W: np.ndarray, tol: float) -> list[int] | None:
    """A cycle of total cost < -tol in the complete digraph W (Bellman-Ford from a virtual source), or None."""
    K = len(W)
    dist = np.zeros(K)
    pred = np.full(K, -1, dtype=np.int64)
    last = -1
    for _ in range(K):
        cand = dist[:, None] + W  # (K, K) distance to l through k
        src = cand.argmin(axis=0)  # (K,)
        best = cand[src, np.arange(K)]
        improve = best < dist - tol
        if not improve.any():
            return None
        dist[improve], pred[improve] = best[improve], src[improve]
        last = int(np.flatnonzero(improve)[0])
    node = last
    for _ in range(K):  # walk back K steps to land on the cycle
        node = int(pred[node])
    cycle, cur = [node], int(pred[node])
    while cur != node:
        cycle.append(cur)
        cur = int(pred[cur])
    cycle.reverse()  # edges cycle[i] -> cycle[i + 1]
    total = sum(W[cycle[i], cycle[(i + 1) % len(cycle)]] for i in range(len(cycle)))
    return cycle if total < -tol else None


def balanced_assign(cost: np.ndarray, capacities: np.ndarray | None = None,
                    init_labels: np.ndarray | None = None) -> np.ndarray:
    """Exact min-cost assignment: cost (N, K) -> (N,) int64 labels with ``bincount == capacities``.

    `capacities` default to `routing.assign.default_capacities(N, K)` and must sum to N.
    `init_labels` (a feasible assignment) warm-starts the search; else the greedy balanced assignment.
    """
    cost = np.asarray(cost, dtype=np.float64)
    N, K = cost.shape
    check_clustering_input(N, K)
    caps = default_capacities(N, K) if capacities is None else np.asarray(capacities, dtype=np.int64)
    if caps.shape != (K,) or caps.sum() != N or np.any(caps < 1):
        raise SmallTalkError(f"balanced k-means: capacities {caps.tolist()} must be {K} positive integers summing "
                             f"to {N}")
    if init_labels is not None and np.array_equal(np.bincount(init_labels, minlength=K), caps):
        labels = np.asarray(init_labels, dtype=np.int64).copy()
    else:
        labels = balanced_assignment(-cost, caps)
    # Moves that gain less than this are float noise; without it rounding could cycle forever.
    tol = 1e-9 * (float(np.abs(cost).max()) + 1.0)
    while True:
        while _swap_pairs(cost, labels, K, tol):
            pass
        W, _ = _cheapest_moves(cost, labels, K)
        cycle = _negative_cycle(W, tol)
        if cycle is None:
            return labels
        _cancel_cycle(cost, labels, cycle, tol)


def _cancel_cycle(cost: np.ndarray, labels: np.ndarray, cycle: list[int], tol: float) -> None:
    """Move points around `cycle` (k0 -> k1 -> ... -> k0), as many rounds as still gain.

    Round t moves the t-th cheapest point of each cluster to the next one. Points of different
    clusters are distinct and move costs add up, so every round is itself a valid cycle; the round
    sums only grow with t, so the profitable rounds are a prefix.
    """
    edges = list(zip(cycle, cycle[1:] + cycle[:1]))
    movers, gains = [], []
    for a, b in edges:
        members = np.flatnonzero(labels == a)
        gain = cost[members, b] - cost[members, a]
        order = np.argsort(gain, kind="stable")
        movers.append(members[order])
        gains.append(gain[order])
    n = min(len(g) for g in gains)
    rounds = np.sum([g[:n] for g in gains], axis=0)  # (n,) increasing
    count = max(1, int(np.searchsorted(rounds, -tol, side="left")))  # the first round gains (found by BF)
    for (a, b), who in zip(edges, movers):
        labels[who[:count]] = b


def kmeans_plus_plus(points: np.ndarray, num_clusters: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding: (K, d) initial centroids drawn from the points."""
    N = len(points)
    chosen = [int(rng.integers(N))]
    d2 = squared_distances(points, points[chosen])[:, 0]
    for _ in range(1, num_clusters):
        total = d2.sum()
        if total > 0:
            nxt = int(rng.choice(N, p=d2 / total))
        else:  # every point sits on a chosen centroid (duplicates): any unchosen point will do
            rest = np.setdiff1d(np.arange(N), chosen)
            nxt = int(rng.choice(rest))
        chosen.append(nxt)
        d2 = np.minimum(d2, squared_distances(points, points[[nxt]])[:, 0])
    return points[chosen].astype(np.float64)


def balanced_kmeans(points: np.ndarray, num_clusters: int, *, capacities: np.ndarray | None = None,
                    max_iter: int = 100, n_init: int = 1, seed: int = 0) -> BalancedKMeansResult:
    """Cluster `points` (N, d) into `num_clusters` clusters of exactly `capacities` points each
    (default: N // K, the first N % K clusters one more). The best of `n_init` seeded runs is kept."""
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2:
        raise SmallTalkError(f"balanced k-means: points must be a 2-D (num_points, dim) array, got {points.shape}")
    N = len(points)
    check_clustering_input(N, num_clusters)
    if not np.all(np.isfinite(points)):
        raise SmallTalkError("balanced k-means: points contain NaN or inf")
    if max_iter < 1 or n_init < 1:
        raise SmallTalkError(f"balanced k-means: max_iter={max_iter} and n_init={n_init} must be >= 1")
    caps = default_capacities(N, num_clusters) if capacities is None else np.asarray(capacities, dtype=np.int64)
    best: BalancedKMeansResult | None = None
    for run in range(n_init):
        rng = np.random.default_rng([seed, run])
        centroids = kmeans_plus_plus(points, num_clusters, rng)
        labels = None
        converged = False
        it = 0
        for it in range(1, max_iter + 1):
            new = balanced_assign(squared_distances(points, centroids), caps, init_labels=labels)
            if labels is not None and np.array_equal(new, labels):
                converged = True
                break
            labels = new
            centroids = cluster_means(points, labels, num_clusters)
        inertia = float(squared_distances(points, centroids)[np.arange(N), labels].sum())
        result = BalancedKMeansResult(centroids, labels, inertia, it, converged)
        if best is None or result.inertia < best.inertia:
            best = result
    return best  # type: ignore[return-value]


def cluster_means(points: np.ndarray, labels: np.ndarray, num_clusters: int) -> np.ndarray:
    """(K, d) mean of each cluster's points (clusters are never empty under capacities >= 1)."""
    sums = np.zeros((num_clusters, points.shape[1]))
    np.add.at(sums, labels, points)
    counts = np.bincount(labels, minlength=num_clusters)[:, None]
    return sums / np.maximum(counts, 1)


def within_cluster_distance(points: np.ndarray, labels: np.ndarray, num_clusters: int) -> float:
    """Mean squared distance of a point to its cluster's mean: what k-means minimises, per point."""
    points = np.asarray(points, dtype=np.float64)
    centroids = cluster_means(points, labels, num_clusters)
    return float(((points - centroids[labels]) ** 2).sum(1).mean())


def nearest_centroid(points: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """(N,) index of the closest centroid (no capacities: what inference does); ties -> lower index."""
    return squared_distances(np.asarray(points, dtype=np.float64), centroids).argmin(axis=1)
