"""Remote experts and faults: real backend processes (`smalltalk serve MODEL_DIR`) behind a real front-end,
a backend that is down or never answers, clients that leave mid-stream, SIGTERM, and a bounded load test."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest
from openai import OpenAI

from serving_helpers import ServerProcess, free_port, rss_mb

ENGLISH = "The history of the city begins in the early middle ages, when a small settlement grew"
CODE = "def parse_args(argv):\n    parser = argparse.ArgumentParser()\n    parser.add_argument("
PROMPTS = [ENGLISH, CODE, "In 1848 the revolution", "import numpy as np\nimport torch\n", "The river flows",
           "class Config:\n    def __init__(self", "She was born in", "for i in range(10):\n", "Paris is",
           "return x + y\n", "The committee decided", "    def forward(self, x):\n"]


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    return tmp_path_factory.mktemp("serve-remote")


@pytest.fixture(scope="module")
def local(tiny_mixture, logs):
    with ServerProcess(tiny_mixture["bundle"], "--served-model-name", "tm", "--max-loaded-experts", "2",
                       log_dir=logs) as s:
        yield s


@pytest.fixture(scope="module")
def backends(tiny_mixture, logs):
    """Expert 0 and expert 1 of the bundle, each served from its model directory by its own process."""
    with ServerProcess(tiny_mixture["experts"][0], log_dir=logs) as b0, \
            ServerProcess(tiny_mixture["experts"][1], log_dir=logs) as b1:
        yield b0, b1


@pytest.fixture(scope="module")
def front(tiny_mixture, backends, logs):
    b0, b1 = backends
    with ServerProcess(tiny_mixture["bundle"], "--served-model-name", "tm", "--expert-url", f"0={b0.v1}",
                       "--expert-url", f"1={b1.v1}", log_dir=logs) as s:
        yield s


def test_front_end_forwards_to_the_routed_experts_server(front, local, backends):
    fc, lc = (OpenAI(base_url=s.v1, api_key="x", max_retries=0, timeout=120) for s in (front, local))
    kw = dict(model="tm", prompt=[ENGLISH, CODE], max_tokens=12, temperature=0)
    remote, here = fc.completions.create(**kw), lc.completions.create(**kw)
    assert [c.text for c in remote.choices] == [c.text for c in here.choices]
    routes = remote.model_extra["smalltalk"]["routes"]
    assert [r["expert"] for r in routes] == [0, 1] and all(r["remote"] for r in routes)
    # each backend really answered its own expert's requests
    for b, n in zip(backends, (1, 1)):
        metrics = httpx.get(f"{b.url}/metrics").text
        assert 'smalltalk_requests_total{endpoint="/v1/completions",status="200"} ' in metrics
    # streaming and echo + logprobs pass through
    chunks = list(fc.completions.create(model="tm", prompt=CODE, max_tokens=12, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == here.choices[1].text
    lp_remote = fc.completions.create(model="tm", prompt=ENGLISH, max_tokens=1, temperature=0, echo=True, logprobs=1)
    lp_here = lc.completions.create(model="tm", prompt=ENGLISH, max_tokens=1, temperature=0, echo=True, logprobs=1)
    assert lp_remote.choices[0].logprobs.token_logprobs == pytest.approx(lp_here.choices[0].logprobs.token_logprobs,
                                                                        abs=1e-5)
    models = httpx.get(f"{front.v1}/models").json()["data"]
    assert models[1]["smalltalk"]["remote"] == backends[0].v1


class SilentServer:
    """Accepts connections and never answers: a remote expert that hangs."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                self.conns.append(self.sock.accept()[0])
            except OSError:
                continue

    def close(self):
        self._stop = True
        for c in self.conns:
            c.close()
        self.sock.close()


@pytest.mark.parametrize("fault", ["down", "timeout"])
def test_a_down_expert_is_503_and_the_others_still_answer(tiny_mixture, backends, logs, fault):
    silent = SilentServer() if fault == "timeout" else None
    port = silent.port if silent else free_port()  # nothing listens on a fresh free port
    url = f"http://127.0.0.1:{port}/v1"
    try:
        with ServerProcess(tiny_mixture["bundle"], "--served-model-name", "tm", "--expert-url",
                           f"0={backends[0].v1}", "--expert-url", f"1={url}", "--expert-timeout", "2",
                           log_dir=logs) as s:
            bad = httpx.post(f"{s.v1}/completions", json={"model": "tm", "prompt": CODE, "max_tokens": 4}, timeout=60)
            assert bad.status_code == 503, bad.text
            msg = bad.json()["error"]["message"]
            assert f"expert 1 at {url}" in msg and ("timed out" if fault == "timeout" else "cannot be reached") in msg
            ok = httpx.post(f"{s.v1}/completions", json={"model": "tm", "prompt": ENGLISH, "max_tokens": 4}, timeout=60)
            assert ok.status_code == 200 and ok.headers["x-smalltalk-expert"] == "0"
            stream = httpx.post(f"{s.v1}/completions", json={"model": "tm", "prompt": CODE, "max_tokens": 4,
                                                             "stream": True}, timeout=60)
            assert "expert 1" in stream.text and "error" in stream.text
            assert httpx.get(f"{s.url}/health", timeout=10).json()["active_requests"] == 0
    finally:
        if silent:
            silent.close()


def _metric(server, name: str) -> float:
    return server.metrics().get(name, 0.0)


def test_client_leaving_mid_stream_stops_generation(local):
    before = _metric(local, 'smalltalk_tokens_total{kind="completion"}')

    async def leave_after_first_chunk(i: int) -> None:
        async with httpx.AsyncClient(timeout=60) as client:
            body = {"model": "tm", "prompt": PROMPTS[i], "max_tokens": 128, "temperature": 0, "stream": True}
            async with client.stream("POST", f"{local.v1}/completions", json=body) as resp:
                async for line in resp.aiter_lines():
                    if line.startswith("data:"):
                        return  # close the connection after the first token

    async def main():
        await asyncio.gather(*(leave_after_first_chunk(i) for i in range(4)))

    asyncio.run(main())
    deadline = time.monotonic() + 60
    while httpx.get(f"{local.url}/health").json()["active_requests"] and time.monotonic() < deadline:
        time.sleep(0.1)
    health = httpx.get(f"{local.url}/health").json()
    assert health["active_requests"] == 0 and health["queue_depth"] == 0
    time.sleep(0.5)
    generated = _metric(local, 'smalltalk_tokens_total{kind="completion"}') - before
    assert 4 <= generated < 4 * 128  # every stream started, none ran to its budget
    ok = httpx.post(f"{local.v1}/completions", json={"prompt": "The", "max_tokens": 2})
    assert ok.status_code == 200


def test_sigterm_finishes_in_flight_requests_then_exits_0(tiny_mixture, logs):
    s = ServerProcess(tiny_mixture["bundle"], "--served-model-name", "tm", log_dir=logs)
    try:
        lines: list[str] = []
        body = {"model": "tm", "prompt": ENGLISH, "max_tokens": 128, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{s.v1}/completions", json=body, timeout=120) as resp:
            for line in resp.iter_lines():
                if line.startswith("data:"):
                    if not lines:
                        s.proc.send_signal(15)  # SIGTERM while the answer is streaming
                    lines.append(line)
        assert lines[-1] == "data: [DONE]"
        finish = json.loads(lines[-2][5:])["choices"][0]["finish_reason"]
        assert finish in ("length", "stop")
        assert s.proc.wait(timeout=120) == 0
    finally:
        s.stop()


def test_load_hundreds_of_concurrent_requests_all_answered_memory_bounded(local):
    client = OpenAI(base_url=local.v1, api_key="x", max_retries=0, timeout=300)
    want = {p: client.completions.create(model="tm", prompt=p, max_tokens=8, temperature=0).choices[0].text
            for p in PROMPTS}
    rss_before = rss_mb(local.proc.pid)

    async def main():
        limit = asyncio.Semaphore(64)
        async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=64)) as http:
            async def one(i: int):
                async with limit:
                    p = PROMPTS[i % len(PROMPTS)]
                    r = await http.post(f"{local.v1}/completions",
                                        json={"model": "tm", "prompt": p, "max_tokens": 8, "temperature": 0})
                    return p, r.status_code, r.json()
            return await asyncio.gather(*(one(i) for i in range(300)))

    results = asyncio.run(main())
    assert all(status == 200 for _, status, _ in results)
    assert all(body["choices"][0]["text"] == want[p] for p, _, body in results)
    assert rss_mb(local.proc.pid) - rss_before < 200
    health = httpx.get(f"{local.url}/health").json()
    assert health["active_requests"] == 0 and health["queue_depth"] == 0
