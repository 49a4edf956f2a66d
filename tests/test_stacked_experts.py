"""One decode step across experts: `StackedExperts` (the experts' weights stacked, batched matmuls) gives each
row its own expert's logits, and a `BatchDecoder` over it decodes rows of several experts, joining and leaving
mid-flight, exactly as each row decodes alone with its own expert (real experts of the tiny mixture)."""

from __future__ import annotations

import pytest
import torch

from sample_text import documents
from smalltalk.data.tokenizer import load_tokenizer
from smalltalk.model.generate import BatchDecoder, Sampling
from smalltalk.model.io import load_model_dir
from smalltalk.model.stacked import StackedExperts


@pytest.fixture(scope="module")
def experts(tiny_mixture):
    return [load_model_dir(d)[0] for d in tiny_mixture["experts"]]


@pytest.fixture(scope="module")
def prompts(tiny_mixture, corpus_dir, text_domains):
    tok = load_tokenizer(tiny_mixture["tokenizer"])
    texts = documents(corpus_dir, "test", text_domains, 2)
    return [tok.encode(t[:n]) for t, n in zip([texts[0][0], texts[1][0], texts[2][0], texts[0][1]], (300, 90, 200, 40))]


@pytest.mark.parametrize("layout", ["rows gather their weights", "grouped by expert"])
def test_each_row_gets_its_own_experts_logits(experts, layout, monkeypatch):
    if layout == "grouped by expert":  # what large experts use: no per-row weight copies
        monkeypatch.setattr("smalltalk.model.stacked.ROW_WEIGHTS_MAX", 0)
    stacked = StackedExperts(experts)
    gen = torch.Generator().manual_seed(0)
    B, T, V = 6, 20, experts[0].config.vocab_size
    idx = torch.randint(0, V, (B, T), generator=gen)
    row_experts = torch.tensor([1, 0, 1, 1, 0, 0])
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[[1, 3], :6] = False  # left padding on two rows
    layers = experts[0].config.num_layers
    with torch.inference_mode():
        logits, caches = stacked(idx, experts=row_experts, kv_caches=[None] * layers, attention_mask=mask,
                                 last_only=False)
        step, _ = stacked(idx[:, -1:], experts=row_experts, kv_caches=caches, start_pos=T,
                          attention_mask=torch.cat([mask, torch.ones(B, 1, dtype=torch.bool)], 1))
        for b in range(B):
            model = experts[int(row_experts[b])]
            ref, ref_caches = model(idx[b:b + 1], kv_caches=[None] * layers, attention_mask=mask[b:b + 1])
            real = mask[b]
            assert (ref[0, real] - logits[b, real]).abs().max() < 1e-5
            ref_step, _ = model(idx[b:b + 1, -1:], kv_caches=ref_caches, start_pos=T,
                                attention_mask=torch.cat([mask[b:b + 1], torch.ones(1, 1, dtype=torch.bool)], 1))
            assert (ref_step - step[b:b + 1]).abs().max() < 1e-5


def test_rows_of_several_experts_decode_as_if_alone(experts, prompts):
    stacked = StackedExperts(experts)
    decoder = BatchDecoder(stacked, [], [])
    plan = {0: [(prompts[1], 1)], 2: [(prompts[0], 0), (prompts[3], 0)], 9: [(prompts[2], 1)]}
    budget = [40, 30, 12, 25]
    got: dict[int, list[tuple[int, float]]] = {}
    order: list[tuple[list[int], int]] = []
    for step in range(60):
        for prompt, expert in plan.get(step, []):
            got[decoder.add(prompt, Sampling(greedy=True), expert)] = []
            order.append((prompt, expert))
        for row, token, logits in decoder.step():
            got[row].append((token, float(torch.log_softmax(logits.float(), -1)[token])))
            if len(got[row]) == budget[row]:
                decoder.finish(row)
    assert not decoder.rows
    for row, (prompt, expert) in enumerate(order):
        alone = BatchDecoder(experts[expert], [prompt], [Sampling(greedy=True)])
        ref = []
        for _ in range(budget[row]):
            (_, token, logits), = alone.step()
            ref.append((token, float(torch.log_softmax(logits.float(), -1)[token])))
        assert [t for t, _ in got[row]] == [t for t, _ in ref], f"row {row} (expert {expert})"
        assert max(abs(a - b) for (_, a), (_, b) in zip(got[row], ref)) < 1e-5


def test_experts_of_different_shapes_are_refused(experts):
    from smalltalk.errors import SmallTalkError
    from smalltalk.model.transformer import Transformer

    other = Transformer(experts[0].config.replace(hidden_size=experts[0].config.hidden_size * 2))
    with pytest.raises(SmallTalkError, match="different model configs"):
        StackedExperts([experts[0], other])
