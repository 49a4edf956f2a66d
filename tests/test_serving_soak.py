"""Load the continuous-batching engine cannot shed: a burst far past --max-batch-size queues and is answered
(greedy text as when each request is sent alone), and requests that keep arriving for 60 s at concurrency 64
leave memory bounded (finished rows free their KV cache). Real server process on loopback, real clients."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from serving_helpers import ServerProcess, rss_mb

PROMPTS = ["The history of the city", "def parse_args(argv):\n", "Le jeune homme", "Im Jahr 1900",
           "The court held that", "import numpy as np\n"]


@pytest.fixture(scope="module")
def server(tiny_mixture, tmp_path_factory):
    with ServerProcess(tiny_mixture["bundle"], "--served-model-name", "tm", "--max-batch-size", "2",
                       log_dir=tmp_path_factory.mktemp("soak")) as s:
        yield s


async def _complete(http: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> httpx.Response:
    return await http.post(f"{url}/v1/completions", json={"model": "tm", "prompt": prompt, "max_tokens": max_tokens,
                                                          "temperature": 0})


def test_a_burst_past_the_batch_size_queues_and_is_answered(server):
    async def run() -> tuple[list[str], list[str]]:
        async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=64)) as http:
            alone = [(await _complete(http, server.url, p, 12)).json()["choices"][0]["text"] for p in PROMPTS]
            burst = await asyncio.gather(*(_complete(http, server.url, PROMPTS[i % len(PROMPTS)], 12)
                                           for i in range(48)))
        assert all(r.status_code == 200 for r in burst), [r.text for r in burst if r.status_code != 200][:1]
        return alone, [r.json()["choices"][0]["text"] for r in burst]

    alone, burst = asyncio.run(run())
    assert burst == [alone[i % len(PROMPTS)] for i in range(48)]
    assert server.metrics()["smalltalk_batch_size_count"] > 0


def test_memory_stays_bounded_under_a_60s_stream_of_requests(server):
    async def soak(seconds: float) -> tuple[int, int, float, float]:
        answered, failed = 0, 0
        stop = time.monotonic() + seconds
        samples: list[float] = []

        async def client(i: int, http: httpx.AsyncClient) -> None:
            nonlocal answered, failed
            while time.monotonic() < stop:
                prompt, tokens = PROMPTS[i % len(PROMPTS)] * (1 + i % 3), 4 + i % 13
                try:
                    r = await _complete(http, server.url, prompt, tokens)
                except httpx.TransportError:  # a pooled keep-alive connection closed as it was reused:
                    r = await _complete(http, server.url, prompt, tokens)  # retried once, as HTTP clients do
                answered += r.status_code == 200
                failed += r.status_code != 200

        async def sampler() -> None:
            while time.monotonic() < stop:
                samples.append(rss_mb(server.proc.pid))
                await asyncio.sleep(2)

        async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=64)) as http:
            await asyncio.gather(sampler(), *(client(i, http) for i in range(64)))
        settled = samples[len(samples) // 4]  # after the first quarter: caches, allocator pools warmed up
        return answered, failed, settled, max(samples[len(samples) // 4:])

    answered, failed, settled, peak = asyncio.run(soak(60.0))
    assert failed == 0 and answered >= 64
    assert peak - settled < 150, f"server memory grew {peak - settled:.0f} MB under steady load"
