"""The `smalltalk` lm-eval model: what lm-eval receives equals our own scoring, with the same routing.

Uses the session `tiny_mixture` (2 routers / 2 experts trained on English wiki vs Python code, and a
dense model) and the real local eval data.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

from smalltalk.errors import SmallTalkError  # noqa: E402
from smalltalk.evaluation.downstream import task_manager  # noqa: E402
from smalltalk.evaluation.lm_eval_model import SmallTalkLM  # noqa: E402
from smalltalk.mixture.inference import Mixture, token_logprobs  # noqa: E402
from smalltalk.model.generate import generate  # noqa: E402
from smalltalk.model.io import load_model_dir  # noqa: E402

ENGLISH = "The history of the city begins in the early middle ages, when a small settlement grew"
CODE = "def parse_args(argv):\n    parser = argparse.ArgumentParser()\n    parser.add_argument("


@pytest.fixture(scope="module")
def lm(tiny_mixture):
    return SmallTalkLM(bundle=str(tiny_mixture["bundle"]), batch_size=16, device="cpu")


@pytest.fixture(scope="module")
def mixture(tiny_mixture):
    return Mixture.load(tiny_mixture["bundle"], max_loaded_experts=2)


@pytest.fixture(scope="module")
def manager():
    return task_manager()


def req(kind: str, args: tuple, task: str = "t", doc_id: int = 0) -> Instance:
    return Instance(kind, {}, args, doc_id, (task, doc_id, 1))


def direct(mixture: Mixture, context_ids: list[int], continuation_ids: list[int], route_ids: list[int]):
    """log p(continuation | context) on the expert the routers pick for `route_ids`, with token_logprobs."""
    expert = mixture.route_ids([route_ids])[0].expert
    full = np.array([context_ids + continuation_ids])
    logp = token_logprobs(mixture.expert(expert), full)[0]  # (T - 1,)
    return float(logp[len(context_ids) - 1:].sum()), expert


def split_pair(mixture: Mixture, context: str, continuation: str) -> tuple[list[int], list[int]]:
    whole, ctx = mixture.encode(context + continuation), mixture.encode(context)
    assert whole[:len(ctx)] == ctx
    return ctx, whole[len(ctx):]


def test_lm_eval_loglikelihoods_equal_direct_scoring(lm, mixture, manager):
    out = simple_evaluate(model=lm, tasks=["blimp_offline_anaphor_number_agreement", "hellaswag_offline"], limit=3,
                          task_manager=manager, log_samples=True)
    checked = 0
    for sample in out["samples"]["blimp_offline_anaphor_number_agreement"]:
        lls = []
        for (context, sentence), resp in zip(sample["arguments"], sample["resps"]):
            assert context == ""
            ids = mixture.encode(sentence)
            want, _ = direct(mixture, [mixture.eos_id], ids, ids)  # empty context: EOS, routed by the sentence
            assert resp[0][0] == pytest.approx(want, abs=1e-4)
            lls.append(resp[0][0])
            checked += 1
        assert sample["acc"] == float(lls[0] > lls[1])
    for sample in out["samples"]["hellaswag_offline"]:
        for (context, ending), resp in zip(sample["arguments"], sample["resps"]):
            ctx, cont = split_pair(mixture, context, ending)
            want, _ = direct(mixture, ctx, cont, ctx)  # routed by the context only
            assert resp[0][0] == pytest.approx(want, abs=1e-4)
            checked += 1
    assert checked == 3 * 2 + 3 * 4
    acc = np.mean([s["acc"] for s in out["samples"]["blimp_offline_anaphor_number_agreement"]])
    assert out["results"]["blimp_offline_anaphor_number_agreement"]["acc,none"] == pytest.approx(acc)


def test_requests_of_one_task_go_to_different_experts(tiny_mixture, mixture):
    lm = SmallTalkLM(bundle=str(tiny_mixture["bundle"]), batch_size=4, device="cpu")
    contexts = [ENGLISH, CODE, ENGLISH[:40], CODE[:30]]
    requests = [req("loglikelihood", (c, " x = 1"), "mixed", i) for i, c in enumerate(contexts)]
    results = lm.loglikelihood(requests)
    routes = [mixture.route(c).expert for c in contexts]
    assert routes == [0, 1, 0, 1]  # English -> the wiki expert, Python -> the code expert
    assert dict(lm.routing_counts["mixed"]) == {0: 2, 1: 2}
    for c, (logp, greedy) in zip(contexts, results):
        ctx, cont = split_pair(mixture, c, " x = 1")
        want, _ = direct(mixture, ctx, cont, ctx)
        assert logp == pytest.approx(want, abs=1e-4)
        assert isinstance(greedy, bool)


def test_single_model_dir_matches_direct_scoring(tiny_mixture, mixture):
    lm = SmallTalkLM(model=str(tiny_mixture["dense"]), batch_size=8, device="cpu")
    dense, _ = load_model_dir(tiny_mixture["dense"])
    (logp, _), = lm.loglikelihood([req("loglikelihood", (ENGLISH, " and became a town."))])
    ctx, cont = split_pair(mixture, ENGLISH, " and became a town.")
    want = float(token_logprobs(dense, np.array([ctx + cont]))[0][len(ctx) - 1:].sum())
    assert logp == pytest.approx(want, abs=1e-4)
    assert dict(lm.routing_counts["t"]) == {0: 1}


def test_context_longer_than_window_is_left_truncated(lm, mixture):
    long_context = " ".join([ENGLISH] * 30)  # far more than the 128-token window
    ctx, cont = split_pair(mixture, long_context, " in the valley.")
    assert len(ctx) > 3 * lm.max_length
    (logp, _), = lm.loglikelihood([req("loglikelihood", (long_context, " in the valley."))])
    # lm-eval's HF rule: keep the last max_length + 1 tokens of context + continuation, drop the last input.
    kept = (ctx + cont)[-(lm.max_length + 1):]
    expert = mixture.route_ids([ctx])[0].expert  # routed by the *start* of the full context
    want = float(token_logprobs(mixture.expert(expert), np.array([kept]))[0][-len(cont):].sum())
    assert logp == pytest.approx(want, abs=1e-4)
    # A shorter window through the `max_length` model argument follows the same rule.
    short = SmallTalkLM(bundle=str(mixture.info.root), max_length=32, device="cpu")
    (logp32, _), = short.loglikelihood([req("loglikelihood", (long_context, " in the valley."))])
    kept = (ctx + cont)[-33:]
    want = float(token_logprobs(mixture.expert(expert), np.array([kept]))[0][-len(cont):].sum())
    assert logp32 == pytest.approx(want, abs=1e-4) and logp32 != pytest.approx(logp, abs=1e-3)


def test_empty_context_uses_eos_and_routes_by_the_scored_text(lm, mixture):
    text = "The cats were sleeping on the warm floor."
    (logp, _), = lm.loglikelihood([req("loglikelihood", ("", text))])
    ids = mixture.encode(text)
    want, _ = direct(mixture, [mixture.eos_id], ids, ids)
    assert logp == pytest.approx(want, abs=1e-4)
    # The strict rule: no context, no routing evidence -> the bundle's fallback expert.
    strict = SmallTalkLM(bundle=str(mixture.info.root), empty_context="fallback", device="cpu")
    (logp_fb, _), = strict.loglikelihood([req("loglikelihood", ("", text), "strict")])
    fallback = mixture.info.fallback_expert
    want_fb = float(token_logprobs(mixture.expert(fallback), np.array([[mixture.eos_id] + ids]))[0].sum())
    assert logp_fb == pytest.approx(want_fb, abs=1e-4)
    assert dict(strict.routing_counts["strict"]) == {fallback: 1}
    # An empty continuation has probability one; it must not crash.
    assert lm.loglikelihood([req("loglikelihood", ("Hello", ""))]) == [(0.0, True)]


def test_rolling_loglikelihood_uses_lm_evals_windows(lm, mixture):
    text = " ".join([CODE] * 12)  # several windows long
    ids = mixture.encode(text)
    assert len(ids) > 2 * lm.max_length
    (got,) = lm.loglikelihood_rolling([req("loglikelihood_rolling", (text,))])
    expert = mixture.route_ids([ids])[0].expert
    model = mixture.expert(expert)
    want = 0.0
    for window in get_rolling_token_windows(ids, mixture.eos_id, lm.max_length, 1):
        inputs, preds = make_disjoint_window(window)
        full = inputs + preds
        want += float(token_logprobs(model, np.array([full]))[0][-len(preds):].sum())
    assert got == pytest.approx(want, rel=1e-5)


def test_continuation_longer_than_window_is_scored_in_rolling_windows(lm, mixture):
    continuation = " " + " ".join([ENGLISH] * 10)
    (logp, _), = lm.loglikelihood([req("loglikelihood", ("Once", continuation))])
    ctx, cont = split_pair(mixture, "Once", continuation)
    assert len(cont) > lm.max_length
    expert = mixture.route_ids([ctx])[0].expert
    model, full, want = mixture.expert(expert), ctx + cont, 0.0
    for a in range(len(ctx), len(full), lm.max_length):  # each token predicted once, with the most context
        b = min(a + lm.max_length, len(full))
        s = max(0, b - 1 - lm.max_length)
        want += float(token_logprobs(model, np.array([full[s:b]]))[0][-(b - a):].sum())
    assert logp == pytest.approx(want, rel=1e-5)


def test_generate_until_without_stop_sequence_runs_to_max_gen_toks(lm, mixture):
    prompts = [CODE, ENGLISH]
    requests = [req("generate_until", (p, {"max_gen_toks": 9, "do_sample": False}), "gen", i)
                for i, p in enumerate(prompts)]
    texts = lm.generate_until(requests)
    for prompt, text in zip(prompts, texts):
        route = mixture.route(prompt)
        ref = generate(mixture.expert(route.expert), mixture.tokenizer, mixture.encode(prompt), 9, greedy=True,
                       eos_id=mixture.eos_id)
        assert text == ref.text
        assert len(ref.token_ids) == 9 or ref.finish_reason == "eos"
    assert dict(lm.routing_counts["gen"]) == {0: 1, 1: 1}


def test_generate_until_stops_at_stop_sequence_and_handles_empty_context(lm, mixture):
    free = lm.generate_until([req("generate_until", (CODE, {"max_gen_toks": 24}))])[0]
    assert len(free) > 12, "the tiny code expert produces some text"
    stop = free[8:11]  # a string that certainly occurs in the output, past its start
    cut = lm.generate_until([req("generate_until", (CODE, {"max_gen_toks": 24, "until": [stop]}))])[0]
    assert cut == free[:free.index(stop)]
    empty = lm.generate_until([req("generate_until", ("", {"max_gen_toks": 5, "until": "\n\n"}), "empty")])
    assert isinstance(empty[0], str)
    assert dict(lm.routing_counts["empty"]) == {mixture.info.fallback_expert: 1}


@pytest.mark.parametrize("kwargs, message", [
    ({}, "exactly one of bundle"),
    ({"bundle": "B", "model": "M"}, "exactly one of bundle"),
    ({"model": "/nonexistent/model"}, "model directory not found"),
    ({"bundle": "/nonexistent/bundle"}, "not a mixture bundle"),
    ({"model": "DENSE", "prefix_len": 8}, "only applies to a mixture bundle"),
    ({"model": "DENSE", "max_length": 100000}, "max_length"),
    ({"model": "DENSE", "batch_size": "lots"}, "batch_size"),
    ({"model": "DENSE", "max_gen_toks": 0}, "max_gen_toks=0 must be a positive integer"),
    ({"model": "DENSE", "pretrained": "gpt2"}, "unknown smalltalk model argument"),
    ({"model": "DENSE", "empty_context": "first"}, "empty_context='first'"),
    ({"bundle": "BUNDLE", "prefix_len": 10_000}, "prefix_len"),
])
def test_bad_model_arguments(tiny_mixture, kwargs, message):
    paths = {"DENSE": str(tiny_mixture["dense"]), "BUNDLE": str(tiny_mixture["bundle"])}
    kwargs = {k: paths.get(v, v) if isinstance(v, str) else v for k, v in kwargs.items()}
    with pytest.raises(SmallTalkError, match=message):
        SmallTalkLM(device="cpu", **kwargs)


def test_full_blimp_paradigm_end_to_end(tiny_mixture, manager):
    """All 1,000 pairs of one paradigm through lm-eval (CI budget: well under a minute)."""
    torch.manual_seed(0)
    lm = SmallTalkLM(bundle=str(tiny_mixture["bundle"]), batch_size=64, device="cpu")
    out = simple_evaluate(model=lm, tasks=["blimp_offline_regular_plural_subject_verb_agreement_1"],
                          task_manager=manager)
    task = "blimp_offline_regular_plural_subject_verb_agreement_1"
    assert out["n-samples"][task]["effective"] == 1000
    assert sum(lm.routing_counts[task].values()) == 2000
    acc = out["results"][task]["acc,none"]
    assert 0.0 < acc < 1.0
    assert out["results"][task]["acc_stderr,none"] == pytest.approx(np.sqrt(acc * (1 - acc) / 999), rel=1e-6)
