"""The API fuzzed from its own request models: hypothesis draws bodies for /v1/completions, /v1/chat/completions,
/tokenize and /detokenize from the pydantic models' fields (well-typed values, edge values and values of the wrong
type, unknown keys), sends them to a real server on loopback, and checks that nothing answers 5xx and that every
answer keeps its schema: the `openai` package's own response types for 200s, an OpenAI error body for 4xx.
Bounded and derandomized: the same examples every run."""

from __future__ import annotations

import json
import typing

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from serving_helpers import ServerProcess
from smalltalk.serving.protocol import ChatRequest, CompletionRequest

VOCAB = 2048  # the tiny mixture's tokenizer
FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

junk = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
                 st.text(max_size=20), st.lists(st.integers(-3, 5), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
token_ids = st.lists(st.integers(-2, VOCAB + 2), min_size=0, max_size=12)

# Well-typed values for the fields where a wrong-but-plausible value is the interesting case.
FIELDS: dict[str, st.SearchStrategy] = {
    "model": st.sampled_from(["tm", "tm/expert-0", "tm/expert-1", "nope", ""]),
    "max_tokens": st.integers(-2, 24),
    "temperature": st.one_of(st.floats(-1, 3), st.just(float("nan")), st.just(float("inf"))),
    "top_p": st.floats(-0.5, 1.5),
    "stop": st.one_of(st.text(max_size=4), st.lists(st.text(max_size=4), max_size=6)),
    "seed": st.integers(-5, 2**66),
    "stream": st.booleans(),
    "stream_options": st.one_of(st.none(), st.fixed_dictionaries({"include_usage": st.booleans()})),
    "n": st.integers(-1, 10),
    "prompt": st.one_of(st.text(max_size=60), token_ids, st.lists(st.text(max_size=20), max_size=3),
                        st.lists(token_ids, max_size=3)),
    "echo": st.booleans(),
    "logprobs": st.one_of(st.none(), st.integers(-2, 25), st.booleans()),
    "ignore_eos": st.booleans(),
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool"]),
                                                "content": st.one_of(st.text(max_size=40), junk)}), max_size=3),
}


def bodies(model: type, required: str) -> st.SearchStrategy:
    """Request bodies from a pydantic model's fields, each absent, well-typed (3 times in 4) or junk; two thirds
    of them carry the `required` field well-typed, so many requests get as far as decoding; sometimes an
    unknown key."""
    fields = {name: st.one_of(*[FIELDS.get(name, junk)] * 3, junk) for name in model.model_fields}
    likely = st.fixed_dictionaries({required: FIELDS[required]}, optional={k: v for k, v in fields.items() if k != required})
    wild = st.fixed_dictionaries({}, optional=fields)
    extra = st.dictionaries(st.sampled_from(["frequency_penalty", "user", "zzz"]), junk, max_size=1)
    return st.builds(lambda a, b: {**b, **a}, st.one_of(likely, likely, wild), extra)


@pytest.fixture(scope="module")
def server(tiny_mixture, tmp_path_factory):
    with ServerProcess(tiny_mixture["bundle"], "--served-model-name", "tm", "--max-batch-size", "4",
                       log_dir=tmp_path_factory.mktemp("fuzz")) as s:
        yield s


def check_error(r: httpx.Response) -> None:
    assert r.status_code < 500, r.text
    error = r.json()["error"]
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)


def sse_chunks(text: str) -> list[dict]:
    lines = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert lines and lines[-1] == "[DONE]", text[-200:]
    return [json.loads(line) for line in lines[:-1]]


def post(server, path: str, body) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", content=json.dumps(body, allow_nan=True),
                      headers={"content-type": "application/json"}, timeout=120)


def answer(server, path: str, body: dict, chunk_type, response_type):
    """The parsed 200 answer (None for an error or a stream, both checked here)."""
    r = post(server, path, body)
    if r.status_code != 200:
        return check_error(r)
    if body.get("stream") is True:
        for chunk in sse_chunks(r.text):
            if "error" not in chunk:  # a mid-stream error is sent as an error chunk (checked by the API tests)
                chunk_type.model_validate(chunk)
        return None
    return response_type.model_validate(r.json())


@FUZZ
@given(body=bodies(CompletionRequest, "prompt"))
def test_completions_fuzz(server, body):
    completion = answer(server, "/v1/completions", body, Completion, Completion)
    if completion is not None:
        n = body.get("n", 1)
        assert len(completion.choices) % n == 0
        assert [c.index for c in completion.choices] == list(range(len(completion.choices)))
        assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens


@FUZZ
@given(body=bodies(ChatRequest, "messages"))
def test_chat_fuzz(server, body):
    chat = answer(server, "/v1/chat/completions", body, ChatCompletionChunk, ChatCompletion)
    if chat is not None:
        assert len(chat.choices) == body.get("n", 1)
        assert all(isinstance(c.message.content, str) for c in chat.choices)


@FUZZ
@given(body=st.one_of(st.fixed_dictionaries({"prompt": st.one_of(st.text(max_size=40), junk)}), junk,
                      st.fixed_dictionaries({"model": junk})))
def test_tokenize_fuzz(server, body):
    r = post(server, "/tokenize", body)
    if r.status_code != 200:
        return check_error(r)
    out = r.json()
    assert all(isinstance(t, int) and 0 <= t < VOCAB for t in out["tokens"]) and out["count"] == len(out["tokens"])


@FUZZ
@given(body=st.one_of(st.fixed_dictionaries({"tokens": st.one_of(token_ids, junk)}), junk))
def test_detokenize_fuzz(server, body):
    r = post(server, "/detokenize", body)
    if r.status_code != 200:
        return check_error(r)
    assert isinstance(r.json()["prompt"], str)


def test_the_fuzzed_fields_are_the_request_models_fields():
    """A field added to a request model gets a strategy of its own or junk: nothing is left unfuzzed silently."""
    for model in (CompletionRequest, ChatRequest):
        hints = typing.get_type_hints(model)
        assert set(model.model_fields) <= set(hints)
        assert {"prompt", "max_tokens", "n", "seed"} <= set(CompletionRequest.model_fields)
