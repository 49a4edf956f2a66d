"""Balanced assignment (paper Figure 1b): exact behaviour, capacities, determinism, optimality report."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from smalltalk.errors import SmallTalkError
from smalltalk.routing.assign import (assignment_objective, balanced_assignment, default_capacities,
                                      greedy_assignment_loop, random_balanced_assignment, segment_sizes)

# Figure 1: 3 sequences (rows) x 3 experts (columns), log-likelihoods, one slot per expert.
# Row order (1a): row 0 takes expert 0, row 1 expert 1, and row 2, which expert 0 suits far better,
# is left with expert 2. Sorting by -max (1b) visits row 2, row 1, row 0 and is optimal.
FIGURE1 = np.array([[-2.0, -2.6, -3.0],
                    [-3.0, -1.5, -2.0],
                    [-1.0, -4.0, -5.0]])


def test_figure1_example():
    sequential = greedy_assignment_loop(FIGURE1, sort=False)
    balanced = balanced_assignment(FIGURE1)
    assert sequential.tolist() == [0, 1, 2]
    assert balanced.tolist() == [2, 1, 0]
    assert assignment_objective(FIGURE1, sequential) == pytest.approx(-8.5)
    assert assignment_objective(FIGURE1, balanced) == pytest.approx(-5.5)
    best = max(assignment_objective(FIGURE1, np.array(p)) for p in itertools.permutations(range(3)))
    assert assignment_objective(FIGURE1, balanced) == pytest.approx(best)


def test_default_capacities_spread_remainder_to_first_experts():
    assert default_capacities(10, 4).tolist() == [3, 3, 2, 2]
    assert default_capacities(8, 4).tolist() == [2, 2, 2, 2]
    assert default_capacities(3, 5).tolist() == [1, 1, 1, 0, 0]


@pytest.mark.parametrize("seed", range(5))
def test_capacities_respected_and_each_sequence_assigned_once(seed):
    rng = np.random.default_rng(seed)
    N, E = 1003, 7
    # Correlated scores (every sequence prefers expert 0) force many experts to fill up.
    scores = rng.normal(size=(N, E)) - 0.5 * np.arange(E)
    a = balanced_assignment(scores)
    assert a.shape == (N,) and a.dtype == np.int64
    assert segment_sizes(a, E).tolist() == default_capacities(N, E).tolist()  # sums to N: exactly full
    caps = np.array([400, 0, 300, 100, 103, 50, 60])  # sum 1013 > N: unequal, one empty
    a = balanced_assignment(scores, caps)
    sizes = segment_sizes(a, E)
    assert np.all(sizes <= caps) and sizes.sum() == N and sizes[1] == 0


def test_vectorised_equals_sequential_loop_including_ties():
    rng = np.random.default_rng(0)
    for trial in range(200):
        N, E = int(rng.integers(1, 40)), int(rng.integers(1, 6))
        # Integer scores create many ties between sequences and between experts.
        scores = rng.integers(-3, 0, size=(N, E)).astype(float) if trial % 2 else rng.normal(size=(N, E))
        caps = None
        if trial % 3 == 0:
            caps = rng.integers(0, N + 1, size=E)
            caps[0] += max(0, N - caps.sum())
        np.testing.assert_array_equal(balanced_assignment(scores, caps), greedy_assignment_loop(scores, caps))


def test_ties_go_to_lower_index():
    scores = np.zeros((4, 2))  # all tied: visit in index order, prefer expert 0 until full
    assert balanced_assignment(scores).tolist() == [0, 0, 1, 1]


def test_deterministic_and_random_initial_assignment():
    scores = np.random.default_rng(1).normal(size=(500, 8)).astype(np.float32)
    np.testing.assert_array_equal(balanced_assignment(scores), balanced_assignment(scores.copy()))
    r1, r2 = random_balanced_assignment(101, 4, seed=3), random_balanced_assignment(101, 4, seed=3)
    np.testing.assert_array_equal(r1, r2)
    assert not np.array_equal(r1, random_balanced_assignment(101, 4, seed=4))
    assert segment_sizes(r1, 4).tolist() == [26, 25, 25, 25]


def test_bad_scores_and_capacities_raise():
    with pytest.raises(SmallTalkError, match="non-finite"):
        balanced_assignment(np.array([[0.0, np.nan], [1.0, 2.0]]))
    with pytest.raises(SmallTalkError, match="capacities sum"):
        balanced_assignment(np.zeros((5, 2)), capacities=[2, 2])
    with pytest.raises(SmallTalkError, match="2-D"):
        balanced_assignment(np.zeros(5))


def test_report_objective_vs_optimal(record_property):
    """Report (not assert) how close the greedy gets to the optimum of the capacity-expanded problem,
    with the row-order greedy of Figure 1a for context."""
    rng = np.random.default_rng(0)
    gaps, row_order_gaps, at_optimum = [], [], 0
    for _ in range(50):
        N, E = int(rng.integers(6, 60)), int(rng.integers(2, 6))
        scores = rng.normal(size=(N, E)) * rng.uniform(0.1, 3.0, size=E)
        caps = default_capacities(N, E)
        cost = -np.repeat(scores, caps, axis=1)  # (N, N): one column per expert slot
        rows, cols = linear_sum_assignment(cost)
        optimum = -cost[rows, cols].sum()
        greedy = assignment_objective(scores, balanced_assignment(scores))
        row_order = assignment_objective(scores, greedy_assignment_loop(scores, sort=False))
        gaps.append((optimum - greedy) / N)
        row_order_gaps.append((optimum - row_order) / N)
        at_optimum += bool(optimum - greedy < 1e-9)
        assert optimum >= greedy - 1e-9 and optimum >= row_order - 1e-9  # sanity: the optimum is an upper bound
    report = {"mean_gap_per_seq": float(np.mean(gaps)), "worst_gap_per_seq": float(np.max(gaps)),
              "cases_at_optimum": at_optimum, "row_order_mean_gap_per_seq": float(np.mean(row_order_gaps))}
    for k, v in report.items():
        record_property(k, v)
    print(f"\nbalanced assignment vs optimum over 50 random cases: {report}")
