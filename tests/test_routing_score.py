"""Batched prefix scoring of E routers (paper Eq. 7-9) against a plain loop over routers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from smalltalk.errors import SmallTalkError
from smalltalk.model.config import preset
from smalltalk.model.transformer import Transformer
from smalltalk.routing.score import StackedRouters, check_prefix_len, prefix_scores, prefix_scores_loop


def _routers(E: int, **overrides) -> list[Transformer]:
    cfg = preset("tiny", vocab_size=512, max_seq_len=64, **overrides)
    models = []
    for e in range(E):
        torch.manual_seed(e)
        m = Transformer(cfg).eval()
        with torch.no_grad():  # break the symmetric init so routers really differ (incl. biases and LayerNorms)
            for p in m.parameters():
                p.add_(0.05 * torch.randn_like(p))
        models.append(m)
    return models


def test_batched_equals_loop_over_routers():
    models = _routers(3)
    tokens = torch.randint(0, 512, (11, 64), generator=torch.Generator().manual_seed(0))
    batched = prefix_scores(models, tokens, prefix_len=40, batch_size=4)
    loop = prefix_scores_loop(models, tokens, prefix_len=40, batch_size=5)
    assert batched.shape == (11, 3) and batched.dtype == np.float64  # summed by rule.window_scores, as every routing path
    np.testing.assert_allclose(batched, loop, rtol=2e-5, atol=2e-3)
    # Scores are log-likelihoods of M-1 predicted tokens: negative, near -(M-1) log V for random models.
    assert np.all(batched < 0) and abs(batched.mean() / 39 + np.log(512)) < 1.0
    # The routers differ, so the argmax is not constant; and a small head chunk gives the same numbers.
    stacked = StackedRouters(models)
    small_chunks = stacked.token_log_probs(tokens[:3, :40], head_chunk_bytes=4 * 3 * 512 * 7).sum(-1).T
    np.testing.assert_allclose(small_chunks.numpy(), batched[:3], rtol=1e-6, atol=1e-4)


def test_untied_head_and_token_log_probs_shape():
    models = _routers(2, tie_embeddings=False)
    tokens = torch.randint(0, 512, (4, 20), generator=torch.Generator().manual_seed(1))
    logp = StackedRouters(models).token_log_probs(tokens)
    assert logp.shape == (2, 4, 19)
    np.testing.assert_allclose(logp.sum(-1).T.numpy(), prefix_scores_loop(models, tokens, 20), rtol=2e-5, atol=2e-3)


def test_prefix_only_reads_first_m_tokens():
    models = _routers(2)
    tokens = torch.randint(0, 512, (3, 64), generator=torch.Generator().manual_seed(2))
    changed = tokens.clone()
    changed[:, 16:] = 0
    np.testing.assert_array_equal(prefix_scores(models, tokens, 16), prefix_scores(models, changed, 16))


def test_bad_prefix_and_tokens_raise():
    models = _routers(2)
    tokens = torch.randint(0, 512, (2, 32))
    with pytest.raises(SmallTalkError, match="prefix_len=33 is longer than the data's sequences"):
        prefix_scores(models, tokens, 33)
    with pytest.raises(SmallTalkError, match=">= 2"):
        check_prefix_len(1, 32)
    with pytest.raises(SmallTalkError, match="routers' context"):
        check_prefix_len(100, 200, max_seq_len=64)
    with pytest.raises(SmallTalkError, match="different tokenizers"):
        prefix_scores(models, torch.full((2, 32), 600), 32)
    with pytest.raises(SmallTalkError, match="different model configs"):
        StackedRouters([models[0], _routers(1, hidden_size=32, num_heads=2)[0]])
