"""Generation: KV cache == no cache, batching, sampling filters, seeds, stop strings, EOS, context window, CLI."""

from __future__ import annotations

import math

import pytest
import torch

from sample_text import documents
from smalltalk.cli import main
from smalltalk.errors import SmallTalkError
from smalltalk.model.config import preset
from smalltalk.model.generate import decode, encode, eos_token_id, generate, generate_batch, sample_next
from smalltalk.model.io import save_model_dir
from smalltalk.model.transformer import Transformer

@pytest.fixture(scope="module")
def model(tokenizer):
    """Tiny model with confident (non-uniform) predictions: init_std 0.1 makes greedy ties impossible in practice."""
    torch.manual_seed(0)
    return Transformer(preset("tiny", vocab_size=tokenizer.vocab_size, max_seq_len=64, init_std=0.1)).eval()


@pytest.fixture(scope="module")
def prompts(corpus_dir, text_domains):
    texts = documents(corpus_dir, "test", text_domains, 1)
    return [texts[0][:120], texts[1][:40], texts[2][:200]]  # wiki, code, French; different lengths


def test_greedy_with_cache_equals_without_cache(model, tokenizer, prompts):
    for prompt in prompts:
        # 80 new tokens on a 64-token context: the window shifts (cache rebuilt) at least once.
        cached = generate(model, tokenizer, prompt, 80, greedy=True, ignore_eos=True)
        full = generate(model, tokenizer, prompt, 80, greedy=True, ignore_eos=True, use_cache=False)
        assert cached.token_ids == full.token_ids
        assert len(cached.token_ids) == 80 and cached.finish_reason == "length"
        assert cached.text == decode(tokenizer, cached.token_ids)
        assert len(set(cached.token_ids)) > 5  # not a degenerate constant output


def test_long_prompt_is_left_truncated(model, tokenizer, prompts):
    ids = encode(tokenizer, prompts[2] * 3)
    assert len(ids) > 64
    result = generate(model, tokenizer, ids, 5, greedy=True, ignore_eos=True)
    assert result.prompt_truncated and result.prompt_ids == ids[-64:]
    same = generate(model, tokenizer, ids[-64:], 5, greedy=True, ignore_eos=True)
    assert result.token_ids == same.token_ids and not same.prompt_truncated


def test_batch_equals_one_by_one(model, tokenizer, prompts):
    batch = generate_batch(model, tokenizer, prompts, 30, greedy=True, ignore_eos=True)
    for prompt, result in zip(prompts, batch):
        alone = generate(model, tokenizer, prompt, 30, greedy=True, ignore_eos=True)
        assert result.token_ids == alone.token_ids
        assert result.prompt_ids == encode(tokenizer, prompt)[-64:]


def test_seed_fixes_sampling(model, tokenizer, prompts):
    kw = dict(temperature=1.0, top_k=50, top_p=0.95, ignore_eos=True)
    a = generate(model, tokenizer, prompts[0], 40, seed=1, **kw)
    b = generate(model, tokenizer, prompts[0], 40, seed=1, **kw)
    c = generate(model, tokenizer, prompts[0], 40, seed=2, **kw)
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids
    greedy = generate(model, tokenizer, prompts[0], 40, greedy=True, ignore_eos=True)
    assert generate(model, tokenizer, prompts[0], 40, top_k=1, seed=5, ignore_eos=True).token_ids == greedy.token_ids
    assert generate(model, tokenizer, prompts[0], 40, temperature=0, ignore_eos=True).token_ids == greedy.token_ids
    assert generate(model, tokenizer, prompts[0], 40, top_p=1e-6, seed=5, ignore_eos=True).token_ids == greedy.token_ids


def test_sample_next_filters_and_temperature():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next(logits, top_k=2, generator=gen) for _ in range(2000)])
    assert set(draws.unique().tolist()) == {0, 1}
    # probs = softmax = [.636, .234, .086, .032, .012]: top_p=0.8 keeps {0, 1} (0.636 < 0.8 <= 0.870).
    draws = torch.stack([sample_next(logits, top_p=0.8, generator=gen) for _ in range(2000)])
    assert set(draws.unique().tolist()) == {0, 1}
    freq1 = (draws == 1).float().mean().item()
    assert freq1 == pytest.approx(math.exp(2) / (math.exp(3) + math.exp(2)), abs=0.03)  # renormalised
    # temperature 2: empirical frequencies follow softmax(logits / 2)
    draws = sample_next(logits.expand(20000, 5), temperature=2.0, generator=gen)
    expected = torch.softmax(logits[0] / 2, dim=-1)
    observed = torch.bincount(draws, minlength=5).float() / 20000
    assert (observed - expected).abs().max().item() < 0.015
    assert sample_next(logits, greedy=True).item() == 0


def test_stop_string_cuts_text(model, tokenizer, prompts):
    full = generate(model, tokenizer, prompts[0], 40, greedy=True, ignore_eos=True)
    stop = full.text[len(full.text) // 2:][:3]
    cut = full.text.index(stop)
    result = generate(model, tokenizer, prompts[0], 40, greedy=True, ignore_eos=True, stop=["@@never@@", stop])
    assert result.finish_reason == "stop"
    assert result.text == full.text[:cut]
    assert result.token_ids == full.token_ids[:len(result.token_ids)] and len(result.token_ids) < 40
    assert stop in decode(tokenizer, result.token_ids)  # the last token completed the stop string


def test_eos_ends_generation(model, tokenizer, prompts):
    full = generate(model, tokenizer, prompts[1], 30, greedy=True, ignore_eos=True)
    fake_eos = full.token_ids[10]  # pretend the 11th generated token is EOS
    first = full.token_ids.index(fake_eos)
    result = generate(model, tokenizer, prompts[1], 30, greedy=True, eos_id=fake_eos)
    assert result.finish_reason == "eos" and result.token_ids == full.token_ids[:first]
    assert eos_token_id(tokenizer) is not None


def test_empty_prompt_starts_from_eos(model, tokenizer):
    result = generate(model, tokenizer, "", 10, greedy=True, ignore_eos=True)
    assert result.prompt_ids == [eos_token_id(tokenizer)] and len(result.token_ids) == 10


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=0), "max_new_tokens=0"),
    (dict(temperature=-1.0), "temperature=-1.0"),
    (dict(top_k=0), "top_k=0"),
    (dict(top_p=1.5), "top_p=1.5"),
    (dict(stop="\n"), "stop must be a list"),
])
def test_bad_options_are_refused(model, tokenizer, kwargs, message):
    kwargs = {"max_new_tokens": 5, **kwargs}
    with pytest.raises(SmallTalkError, match=message):
        generate(model, tokenizer, "Hello", **kwargs)


def test_out_of_vocabulary_prompt_is_refused(model, tokenizer):
    with pytest.raises(SmallTalkError, match="prompt token id 5000 is outside the model's vocabulary"):
        generate(model, tokenizer, [1, 5000], 5)


def test_cli_generate(model, tokenizer, tokenizer_file, prompts, tmp_path, capsys):
    model_dir = save_model_dir(tmp_path / "model", model, tokenizer_file)
    expected = generate(model, tokenizer, prompts[0], 12, greedy=True)
    assert main(["generate", str(model_dir), "--prompt", prompts[0], "--greedy", "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr()
    assert out.out == expected.text + "\n"
    assert f"[{len(expected.token_ids)} tokens, finish: {expected.finish_reason}" in out.err

    sampled = generate(model, tokenizer, prompts[0], 12, temperature=0.7, top_k=20, seed=3, stop=["\n"])
    assert main(["generate", str(model_dir), "--prompt", prompts[0], "--max-new-tokens", "12", "--temperature",
                 "0.7", "--top-k", "20", "--seed", "3", "--stop", "\n"]) == 0
    assert capsys.readouterr().out == sampled.text + "\n"

    assert main(["generate", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "model directory not found" in capsys.readouterr().err
    assert main(["generate", str(model_dir), "--prompt", "x", "--top-p", "0"]) == 2
    assert "top_p=0.0 must be in (0, 1]" in capsys.readouterr().err


def test_other_tokenizer_types_work_the_same(model, tokenizer, tokenizer_file, prompts):
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(tokenizer_file))  # plain HF tokenizers object
    assert eos_token_id(raw) == eos_token_id(tokenizer) == 2
    ours = generate(model, tokenizer, prompts[0], 15, greedy=True, ignore_eos=True)
    theirs = generate(model, raw, prompts[0], 15, greedy=True, ignore_eos=True)
    assert (theirs.token_ids, theirs.text) == (ours.token_ids, ours.text)


def test_finished_long_row_does_not_push_the_batch_past_the_context(model, tokenizer, prompts):
    """A full-context prompt that ends at once leaves its left padding on the other rows of the batch;
    they must go on (as if alone) instead of growing the batch tensor past the context (GSM8K regression)."""
    long_ids = encode(tokenizer, prompts[2] * 3)[-63:]  # 63 of 64 context tokens
    short = prompts[1]
    first = generate(model, tokenizer, long_ids, 1, greedy=True, ignore_eos=True).token_ids[0]
    alone = generate(model, tokenizer, short, 20, greedy=True, eos_id=first)
    assert len(alone.token_ids) >= 5, "precondition: the short row must outlive the long one by a few tokens"
    long_res, short_res = generate_batch(model, tokenizer, [long_ids, short], 20, greedy=True, eos_id=first)
    assert long_res.finish_reason == "eos" and long_res.token_ids == []
    assert short_res.token_ids == alone.token_ids


def _alone_with_logprobs(model, ids: list[int], steps: int) -> tuple[list[int], list[float]]:
    from smalltalk.model.generate import BatchDecoder, Sampling

    decoder = BatchDecoder(model, [ids], [Sampling(greedy=True)])
    tokens, logps = [], []
    for _ in range(steps):
        (_, token, logits), = decoder.step()
        tokens.append(token)
        logps.append(float(torch.log_softmax(logits.float(), -1)[token]))
    return tokens, logps


def test_rows_joining_mid_flight_decode_as_if_alone(model, tokenizer, prompts):
    """Continuous batching: rows that join a running batch (narrower than it, and wider, which re-pads every
    row) and rows that leave get the tokens they get alone, and log-probs within 1e-5; 90 steps on a 64-token
    context also cross the window shift."""
    from smalltalk.model.generate import BatchDecoder, Sampling

    ids = [encode(tokenizer, p)[-40:] for p in prompts]
    wide = encode(tokenizer, prompts[2] * 3)[-60:]
    plan = {0: [ids[1]], 3: [ids[0]], 10: [wide], 11: [ids[2]]}  # step -> prompts joining before it
    budget = {0: 90, 1: 12, 2: 40, 3: 25}  # row -> tokens it takes, then it leaves
    decoder = BatchDecoder(model, [], [])
    got: dict[int, list[tuple[int, float]]] = {}
    for step in range(95):
        for prompt in plan.get(step, []):
            got[decoder.add(prompt, Sampling(greedy=True))] = []
        for row, token, logits in decoder.step():
            got[row].append((token, float(torch.log_softmax(logits.float(), -1)[token])))
            if len(got[row]) == budget[row]:
                decoder.finish(row)
    joined = [ids[1], ids[0], wide, ids[2]]
    for row, prompt in enumerate(joined):
        tokens, logps = _alone_with_logprobs(model, prompt, budget[row])
        assert [t for t, _ in got[row]] == tokens, f"row {row}"
        assert max(abs(a - b) for (_, a), b in zip(got[row], logps)) < 1e-5
    assert not decoder.rows
