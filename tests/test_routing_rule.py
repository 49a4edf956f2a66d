"""The routing rule (paper Eq. 4-8) in `routing/rule.py`, the one module every routing path calls."""

from __future__ import annotations

import numpy as np
import pytest

from smalltalk.errors import SmallTalkError
from smalltalk.routing import rule


def test_window_scores_sum_the_first_m_minus_one_predictions():
    logp = -np.random.default_rng(0).random((5, 3, 9))  # (N, E, T - 1)
    assert np.allclose(rule.window_scores(logp, 4), logp[:, :, :3].sum(axis=2))
    assert np.allclose(rule.masked_scores(logp, [4] * 5), rule.window_scores(logp, 4))
    lengths = [2, 10, 4, 7, 3]
    want = np.stack([logp[n, :, :lengths[n] - 1].sum(axis=1) for n in range(5)])
    assert np.allclose(rule.masked_scores(logp, lengths), want)


def test_route_is_the_argmax_with_ties_to_the_lower_index():
    scores = np.array([[-3.0, -1.0, -2.0], [-1.0, -1.0, -5.0], [-7.0, -7.0, -7.0]])
    assert rule.route(scores).tolist() == [1, 0, 0]


def test_posterior_is_the_softmax_of_the_scores():
    scores = np.array([[-10.0, -11.0, -13.0], [-1000.0, -1000.0, -2000.0]])
    p = rule.posterior(scores)
    assert np.allclose(p.sum(axis=1), 1.0)
    assert np.allclose(p[0], np.exp(scores[0]) / np.exp(scores[0]).sum())
    assert np.allclose(p[1], [0.5, 0.5, 0.0])  # no overflow with large negative log-likelihoods


def test_prompt_window_adds_one_eos_boundary():
    eos = 2
    assert rule.prompt_window([5, 6, 7, 8], eos, 2) == [eos, 5, 6]
    assert rule.prompt_window([eos, 5, 6, 7], eos, 2) == [eos, 5, 6]  # lm-eval's EOS context is not doubled
    assert rule.prompt_window([], eos, 8) == [] and rule.prompt_window([eos], eos, 8) == []  # fallback expert
    assert rule.prompt_window([5], eos, 8) == [eos, 5]


@pytest.mark.parametrize("value, offset, message", [
    (1, 0, "prefix_len=1 must be >= 2"), (0, 1, "prefix_len=0 must be >= 1"), (2.5, 0, "must be an integer"),
    (True, 0, "must be an integer"), (129, 0, "longer than the routers' context (128 tokens)"),
    (128, 1, "longer than the routers' context (127 tokens)")])
def test_one_validator_for_data_and_prompt_windows(value, offset, message):
    with pytest.raises(SmallTalkError, match=message.replace("(", r"\(").replace(")", r"\)")):
        rule.check_prefix_len(value, {"the routers' context": 128}, offset=offset)
    assert rule.check_prefix_len(2, {"x": 2}) == 2 and rule.check_prefix_len(1, {"x": 2}, offset=1) == 1
