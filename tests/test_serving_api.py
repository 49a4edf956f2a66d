"""`smalltalk serve` on the session's tiny mixture, through the official `openai` client and plain HTTP.

The mixture has two experts (English wiki, Python code); the server is a real process on a loopback port.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from openai import OpenAI

from serving_helpers import ServerProcess
from smalltalk.mixture.inference import Mixture, token_logprobs

ENGLISH = "The history of the city begins in the early middle ages, when a small settlement grew"
CODE = "def parse_args(argv):\n    parser = argparse.ArgumentParser()\n    parser.add_argument("
PROMPTS = [ENGLISH, CODE, "In 1848 the revolution", "import numpy as np\nimport torch\n", "The river flows",
           "class Config:\n    def __init__(self", "She was born in", "for i in range(10):\n"]


@pytest.fixture(scope="module")
def server(tiny_mixture, tmp_path_factory):
    with ServerProcess(tiny_mixture["bundle"], "--served-model-name", "tm", "--max-loaded-experts", "2",
                       "--batch-window-ms", "20",
                       log_dir=tmp_path_factory.mktemp("serve")) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def mixture(tiny_mixture):
    return Mixture.load(tiny_mixture["bundle"], max_loaded_experts=2)


def routes(resp) -> list[dict]:
    return resp.model_extra["smalltalk"]["routes"]


def test_completion_is_the_routed_experts_greedy_continuation(client, mixture):
    resp = client.completions.create(model="tm", prompt=[ENGLISH, CODE], max_tokens=12, temperature=0)
    assert [c.index for c in resp.choices] == [0, 1]
    for prompt, choice, route in zip((ENGLISH, CODE), resp.choices, routes(resp)):
        want = mixture.generate(prompt, 12, greedy=True)
        assert route["expert"] == want.route.expert
        assert choice.text == want.result.text
        assert np.allclose(route["posterior"], want.route.posterior, atol=1e-5)
        assert route["prefix_tokens"] == want.route.num_tokens
    assert [r["expert"] for r in routes(resp)] == [0, 1]  # English -> expert 0, code -> expert 1
    assert resp.usage.completion_tokens == sum(len(mixture.generate(p, 12, greedy=True).result.token_ids)
                                               for p in (ENGLISH, CODE))


def test_expert_header_and_model_list(server):
    r = httpx.post(f"{server.v1}/completions", json={"prompt": [CODE, ENGLISH], "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200 and r.headers["x-smalltalk-expert"] == "1,0"
    ids = [m["id"] for m in httpx.get(f"{server.v1}/models").json()["data"]]
    assert ids == ["tm", "tm/expert-0", "tm/expert-1"]


def test_naming_an_expert_bypasses_routing(client, mixture):
    resp = client.completions.create(model="tm/expert-1", prompt=ENGLISH, max_tokens=8, temperature=0)
    assert routes(resp)[0]["expert"] == 1 and routes(resp)[0]["prefix_tokens"] == 0
    assert resp.choices[0].text == mixture.generate(ENGLISH, 8, expert=1, greedy=True).result.text


def test_seed_fixes_sampling_and_stop_cuts(client):
    kw = dict(model="tm", prompt=ENGLISH, max_tokens=20, temperature=0.9, top_p=0.95)
    a = client.completions.create(seed=7, **kw).choices[0].text
    assert client.completions.create(seed=7, **kw).choices[0].text == a
    assert client.completions.create(seed=8, **kw).choices[0].text != a
    greedy = client.completions.create(model="tm", prompt=ENGLISH, max_tokens=20, temperature=0).choices[0].text
    stop = greedy.strip().split()[1]
    cut = client.completions.create(model="tm", prompt=ENGLISH, max_tokens=20, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == greedy[:greedy.index(stop)]


def test_streaming_gives_the_same_text_token_by_token(client):
    full = client.completions.create(model="tm", prompt=CODE, max_tokens=16, temperature=0)
    chunks = list(client.completions.create(model="tm", prompt=CODE, max_tokens=16, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert len(chunks) >= 8 and chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert chunks[0].model_extra["smalltalk"]["routes"][0]["expert"] == 1


def test_chat_uses_the_plain_template(client, mixture):
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "def add(a, b):"}]
    resp = client.chat.completions.create(model="tm", messages=messages, max_tokens=10, temperature=0)
    rendered = "System: You write Python.\nUser: def add(a, b):\nAssistant:"
    want = mixture.generate(rendered, 10, greedy=True, stop=["\nUser:", "\nSystem:"])
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == want.result.text
    assert resp.model_extra["smalltalk"]["routes"][0]["expert"] == want.route.expert
    stream = client.chat.completions.create(model="tm", messages=messages, max_tokens=10, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want.result.text


def test_echo_logprobs_are_the_experts_token_logprobs(client, mixture):
    resp = client.completions.create(model="tm", prompt=ENGLISH, max_tokens=1, temperature=0, echo=True, logprobs=3)
    lp = resp.choices[0].logprobs
    ids = mixture.encode(ENGLISH)
    expert = mixture.route(ENGLISH).expert
    want = token_logprobs(mixture.expert(expert), np.array([ids]))[0]  # (T - 1,)
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids) + 1
    assert np.allclose(lp.token_logprobs[1:len(ids)], want, atol=1e-4)
    assert resp.choices[0].text.startswith(ENGLISH)
    for chosen, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert len(top) <= 3 and max(top.values()) >= chosen - 1e-6
    # the generated token is the greedy one: its logprob is the top of its position
    assert lp.token_logprobs[-1] == pytest.approx(max(lp.top_logprobs[-1].values()))
    only_prompt = client.completions.create(model="tm", prompt=ENGLISH, max_tokens=0, echo=True, logprobs=0)
    assert only_prompt.choices[0].text == ENGLISH and only_prompt.usage.completion_tokens == 0


def test_greedy_output_does_not_depend_on_the_batch(server, client):
    alone = [client.completions.create(model="tm", prompt=p, max_tokens=10, temperature=0).choices[0].text
             for p in PROMPTS]
    before = _batch_count(server)
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(lambda p: client.completions.create(model="tm", prompt=p, max_tokens=10,
                                                                     temperature=0).choices[0].text, PROMPTS))
    assert together == alone
    steps, row_steps = _batch_count(server)[0] - before[0], _batch_count(server)[1] - before[1]
    # every request decoded 10 tokens, one per step; some steps advanced several rows at once
    assert row_steps == 10 * len(PROMPTS) - _eos_before_ten(alone) and steps < row_steps


def _eos_before_ten(texts) -> int:
    return 0  # greedy completions of these prompts run to max_tokens (checked by the equality above)


def _batch_count(server) -> tuple[float, float]:
    values = server.metrics()
    return values["smalltalk_batch_size_count"], values["smalltalk_batch_size_sum"]


def test_metrics_count_requests_tokens_and_experts(server, client):
    client.completions.create(model="tm", prompt=CODE, max_tokens=3, temperature=0)
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("smalltalk_requests_total", "smalltalk_request_seconds_bucket", "smalltalk_tokens_total",
                 'smalltalk_expert_requests_total{expert="1"}', "smalltalk_queue_depth", "smalltalk_routing_seconds"):
        assert name in text, name
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["experts"] == 2 and health["active_requests"] == 0


def test_tokenizer_endpoints_follow_vllm(server, mixture):
    info = httpx.get(f"{server.url}/tokenizer_info").json()
    assert info["eos_token"] == "<|endoftext|>" and info["bos_token"] is None
    tokens = httpx.post(f"{server.url}/tokenize", json={"prompt": CODE}).json()["tokens"]
    assert tokens == mixture.encode(CODE)
    assert httpx.post(f"{server.url}/tokenize", json={"prompt": info["eos_token"]}).json()["tokens"] == [mixture.eos_id]
    assert httpx.post(f"{server.url}/detokenize", json={"tokens": tokens}).json()["prompt"] == CODE


BAD = [
    ("not json", 400, "not valid JSON"),
    ({"max_tokens": 4}, 400, "prompt is required"),
    ({"prompt": []}, 400, "empty list"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens=0"),
    ({"prompt": "x", "max_tokens": -3}, 400, "max_tokens=-3"),
    ({"prompt": "x", "max_tokens": 129}, 400, "past the context of 128"),
    ({"prompt": "x", "temperature": -0.5}, 400, "temperature=-0.5"),
    ({"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p=0"),
    ({"prompt": "x", "top_p": 1.5}, 400, "top_p=1.5"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "'gpt-4' does not exist"),
    ({"prompt": "x", "n": 9}, 400, "n=9: must be between 1 and 8"),
    ({"prompt": "x", "n": 0}, 400, "n=0: must be between 1 and 8"),
    ({"prompt": "x", "logprobs": 50}, 400, "logprobs=50"),
    ({"prompt": [5, 999999]}, 400, "token id 999999"),
    ({"prompt": "word " * 200}, 400, "more than the context of 128"),
]


@pytest.mark.parametrize("body,status,message", BAD, ids=[b[2] for b in BAD])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, body, status, message):
    kwargs = {"content": body} if isinstance(body, str) else {"json": body}
    r = httpx.post(f"{server.v1}/completions", headers={"content-type": "application/json"}, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert message in error["message"] and error["type"]
    ok = httpx.post(f"{server.v1}/completions", json={"prompt": "The", "max_tokens": 2})
    assert ok.status_code == 200


def test_bad_chat_requests(server):
    r = httpx.post(f"{server.v1}/chat/completions", json={"messages": []})
    assert r.status_code == 400 and "messages is required" in r.json()["error"]["message"]
    r = httpx.post(f"{server.v1}/chat/completions", json={"messages": [{"role": "wizard", "content": "hi"}]})
    assert r.status_code == 400 and "messages.role" in r.json()["error"]["message"]


def test_empty_prompt_goes_to_the_fallback_expert(client, mixture):
    resp = client.completions.create(model="tm", prompt="", max_tokens=5, temperature=0)
    route = routes(resp)[0]
    assert route["fallback"] and route["expert"] == mixture.info.fallback_expert and route["posterior"] is None
    assert resp.choices[0].text == mixture.generate("", 5, greedy=True).result.text


def test_body_over_the_limit_is_413(tiny_mixture, tmp_path):
    with ServerProcess(tiny_mixture["bundle"], "--config", str(_yaml(tmp_path, "max_body_bytes: 1000")),
                       log_dir=tmp_path) as s:
        r = httpx.post(f"{s.v1}/completions", json={"prompt": "x" * 5000})
        assert r.status_code == 413 and "over the limit of 1000 bytes" in r.json()["error"]["message"]
        assert httpx.post(f"{s.v1}/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 200


def test_api_key_is_required_except_on_health(tiny_mixture, tmp_path):
    with ServerProcess(tiny_mixture["dense"], "--api-key", "s3cret", "--long-prompt", "truncate",
                       log_dir=tmp_path) as s:
        assert httpx.get(f"{s.url}/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = httpx.post(f"{s.v1}/completions", json={"prompt": "x"}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert httpx.get(f"{s.v1}/models", headers=headers).status_code == 401
        client = OpenAI(base_url=s.v1, api_key="s3cret", max_retries=0)
        assert [m.id for m in client.models.list()] == ["dense"]
        # a single model directory: no routing, and --long-prompt truncate keeps the prompt's last tokens
        long = client.completions.create(model="dense", prompt="word " * 300, max_tokens=3, temperature=0)
        assert long.usage.prompt_tokens == 128 and long.model_extra["smalltalk"]["routes"][0]["expert"] == 0


def _yaml(tmp_path, text: str):
    path = tmp_path / "serve.yaml"
    path.write_text(text + "\n")
    return path


def test_cli_refuses_bad_serving_config(tiny_mixture, tmp_path, capsys):
    from smalltalk.cli import main

    assert main(["serve", str(tiny_mixture["bundle"]), "--expert-url", "zero=http://x"]) == 2
    assert "K=URL" in capsys.readouterr().err
    assert main(["serve", str(tiny_mixture["bundle"]), "--config", str(_yaml(tmp_path, "colour: red"))]) == 2
    assert "unknown key(s) ['colour']" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "nope")]) == 2
    assert "no such bundle or model directory" in capsys.readouterr().err
    body = json.dumps({"experts": {"0": {"url": "ftp://x"}}})
    assert main(["serve", str(tiny_mixture["bundle"]), "--config", str(_yaml(tmp_path, body))]) == 2
    assert "must start with http://" in capsys.readouterr().err
