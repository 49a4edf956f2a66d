"""Balanced assignment of sequences to experts (paper §2.2, Figure 1b, Algorithm 1 lines 3, 9, 13).

Greedy assignment row by row (Figure 1a) fills an expert early with sequences it is only mildly
good at, and later sequences that it suits much better find it full. The paper's fix: visit
sequences in order of decreasing best score (``-max_e score``, i.e. the most confidently routed
first) and give each its best expert that still has capacity.

Conventions (all deterministic, no randomness):
  * scores are log-likelihoods, higher is better; shape (N, E).
  * the visiting order is a *stable* sort of ``-max_e score``: ties go to the lower sequence index.
  * among experts with equal scores for one sequence, the lower expert index wins.
  * default capacities: ``N // E`` each, and the remainder ``N % E`` goes one extra to each of the
    first ``N % E`` experts (experts 0, 1, ...).

The implementation is exact (it returns what the sequential greedy loop returns) but vectorised:
the greedy is a "serial dictatorship", so it is fully determined by the moment each expert fills
up. We find those moments one at a time, earliest first, each with one numpy pass over the
sequences after the previous moment: at most E passes of O(N * E) instead of a Python loop over N.
"""

from __future__ import annotations

import numpy as np

from ..errors import SmallTalkError

_NEVER = np.iinfo(np.int64).max


def default_capacities(num_seqs: int, num_experts: int) -> np.ndarray:
    """(E,) int64: N // E each, the first N % E experts get one more."""
    if num_experts < 1:
        raise SmallTalkError(f"num_experts={num_experts} must be >= 1")
    caps = np.full(num_experts, num_seqs // num_experts, dtype=np.int64)
    caps[: num_seqs % num_experts] += 1
    return caps


def _check_scores(scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores)
    if scores.ndim != 2 or scores.shape[1] < 1:
        raise SmallTalkError(f"router scores must be a 2-D (num_seqs, num_experts) array, got shape {scores.shape}")
    if not np.all(np.isfinite(scores)):
        bad = np.argwhere(~np.isfinite(scores))[0]
        raise SmallTalkError(f"router scores contain a non-finite value at sequence {bad[0]}, router {bad[1]} "
                             f"({scores[bad[0], bad[1]]}); a router diverged: lower the learning rate and retrain")
    return scores


def _check_capacities(capacities, num_seqs: int, num_experts: int) -> np.ndarray:
    if capacities is None:
        return default_capacities(num_seqs, num_experts)
    caps = np.asarray(capacities, dtype=np.int64)
    if caps.shape != (num_experts,) or np.any(caps < 0):
        raise SmallTalkError(f"capacities must be {num_experts} non-negative integers, got {np.asarray(capacities)}")
    if caps.sum() < num_seqs:
        raise SmallTalkError(f"capacities sum to {int(caps.sum())} < {num_seqs} sequences; "
                             "every sequence must fit somewhere")
    return caps


def assignment_order(scores: np.ndarray) -> np.ndarray:
    """(N,) visiting order: decreasing best score, ties by sequence index."""
    return np.argsort(-scores.max(axis=1), kind="stable")


def balanced_assignment(scores: np.ndarray, capacities=None) -> np.ndarray:
    """Figure 1b. `scores` (N, E) log-likelihoods -> (N,) int64 expert per sequence.

    Every sequence gets exactly one expert and expert e gets at most ``capacities[e]`` sequences
    (exactly the default capacities when `capacities` is None, since they sum to N).
    """
    scores = _check_scores(scores)
    N, E = scores.shape
    caps = _check_capacities(capacities, N, E)
    if N == 0:
        return np.zeros(0, dtype=np.int64)

    order = assignment_order(scores)  # (N,) sequence visited at each step
    # Each sequence's experts from best to worst; stable so equal scores prefer the lower expert.
    prefs = np.argsort(-scores[order], axis=1, kind="stable")  # (N, E), row t = t-th visited sequence

    # fill_step[e]: the step at which expert e took its last free slot; steps after it cannot use e.
    fill_step = np.full(E, _NEVER, dtype=np.int64)
    fill_step[caps == 0] = -1
    choice = np.empty(N, dtype=np.int64)  # (N,) expert chosen at each step
    taken = np.zeros(E, dtype=np.int64)  # (E,) slots used by the final choices (those before `start`)
    steps = np.arange(N, dtype=np.int64)
    start = 0  # choices before `start` are final
    while start < N:
        # Choices from `start` on, assuming experts not yet known to fill stay open forever: correct up
        # to the earliest step at which one of them would take its last slot, which we then record.
        step_ids = steps[start:]  # (n,)
        open_ = step_ids[:, None] <= fill_step[prefs[start:]]  # (n, E) is preference k still open at that step
        if not open_.any(axis=1).all():
            raise AssertionError("capacities sum to >= N, so some expert is always open")  # unreachable
        choice[start:] = prefs[start:][np.arange(len(step_ids)), open_.argmax(axis=1)]

        # For each still-open expert, the step at which its count (including earlier final choices) hits capacity.
        earliest, earliest_expert = _NEVER, -1
        for e in np.flatnonzero(fill_step == _NEVER):
            hits = np.flatnonzero(choice[start:] == e)
            need = int(caps[e] - taken[e])  # > 0: e is still open
            if len(hits) >= need and start + hits[need - 1] < earliest:
                earliest, earliest_expert = start + int(hits[need - 1]), int(e)
        if earliest_expert < 0:
            break  # no expert fills up in the rest: all remaining choices are final
        fill_step[earliest_expert] = earliest
        taken += np.bincount(choice[start:earliest + 1], minlength=E)
        start = earliest + 1

    assignment = np.empty(N, dtype=np.int64)
    assignment[order] = choice
    return assignment


def greedy_assignment_loop(scores: np.ndarray, capacities=None, sort: bool = True) -> np.ndarray:
    """The sequential reference of Figure 1: visit sequences (sorted as in `balanced_assignment` when `sort`,
    else in row order as in Figure 1a) and give each its best expert with capacity left. O(N * E) in Python:
    for tests and small N only."""
    scores = _check_scores(scores)
    N, E = scores.shape
    caps = _check_capacities(capacities, N, E).copy()
    assignment = np.empty(N, dtype=np.int64)
    for i in (assignment_order(scores) if sort else range(N)):
        for e in np.argsort(-scores[i], kind="stable"):
            if caps[e] > 0:
                caps[e] -= 1
                assignment[i] = e
                break
    return assignment


def random_balanced_assignment(num_seqs: int, num_experts: int, seed: int) -> np.ndarray:
    """Algorithm 1 line 3: a uniformly random assignment with the default (balanced) capacities."""
    labels = np.repeat(np.arange(num_experts, dtype=np.int64), default_capacities(num_seqs, num_experts))
    return np.random.default_rng(seed).permutation(labels)


def assignment_objective(scores: np.ndarray, assignment: np.ndarray) -> float:
    """Total log-likelihood of an assignment (what balanced assignment greedily tries to maximise)."""
    return float(np.asarray(scores, dtype=np.float64)[np.arange(len(assignment)), assignment].sum())


def segment_sizes(assignment: np.ndarray, num_experts: int) -> np.ndarray:
    """(E,) number of sequences assigned to each expert."""
    return np.bincount(assignment, minlength=num_experts).astype(np.int64)
