"""Forwarding a routed prompt to a remote expert: any OpenAI-compatible `/v1/completions` server.

The front-end sends the prompt as token ids (its own tokenization, which the expert's Hugging Face
export shares), so the expert sees exactly the tokens that were routed. A server that cannot be
reached, or does not answer within `expert_timeout_s`, is a 503 naming the expert; requests routed
to the other experts are not affected.
"""

from __future__ import annotations

import json
from typing import AsyncIterator

import httpx

from .config import RemoteExpert
from .protocol import APIError


class RemoteExperts:
    def __init__(self, experts: dict[int, RemoteExpert], timeout_s: float):
        self.experts = experts
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0)))
        self._names: dict[int, str] = {}

    async def aclose(self) -> None:
        await self.client.aclose()

    def _headers(self, x: RemoteExpert) -> dict:
        return {"Authorization": f"Bearer {x.api_key}"} if x.api_key else {}

    def _down(self, x: RemoteExpert, err: Exception) -> APIError:
        kind = "timed out" if isinstance(err, httpx.TimeoutException) else f"cannot be reached ({type(err).__name__})"
        return APIError(503, f"expert {x.index} at {x.url} {kind}; the other experts still answer",
                        type="expert_unavailable", param="model", code="expert_unavailable")

    async def model_name(self, k: int) -> str:
        x = self.experts[k]
        if x.model:
            return x.model
        if k not in self._names:
            try:
                resp = await self.client.get(f"{x.url}/models", headers=self._headers(x))
            except httpx.HTTPError as e:
                raise self._down(x, e) from None
            self._check(x, resp)
            try:
                self._names[k] = resp.json()["data"][0]["id"]
            except (ValueError, KeyError, IndexError, TypeError):
                raise APIError(502, f"expert {k} at {x.url}/models listed no model; set its model name in the "
                                    "serving config", type="expert_unavailable") from None
        return self._names[k]

    def _check(self, x: RemoteExpert, resp: httpx.Response) -> None:
        if resp.status_code < 400:
            return
        try:
            message = resp.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = resp.text[:200]
        status = resp.status_code if resp.status_code < 500 else 502
        raise APIError(status, f"expert {x.index} at {x.url}: {message}", type="expert_error")

    async def complete(self, k: int, body: dict) -> dict:
        x = self.experts[k]
        payload = {**body, "model": await self.model_name(k), "stream": False}
        try:
            resp = await self.client.post(f"{x.url}/completions", json=payload, headers=self._headers(x))
        except httpx.HTTPError as e:
            raise self._down(x, e) from None
        self._check(x, resp)
        return resp.json()

    async def stream(self, k: int, body: dict) -> AsyncIterator[dict]:
        """The expert's server-sent chunks, parsed; stops at [DONE]."""
        x = self.experts[k]
        payload = {**body, "model": await self.model_name(k), "stream": True}
        try:
            async with self.client.stream("POST", f"{x.url}/completions", json=payload,
                                          headers=self._headers(x)) as resp:
                if resp.status_code >= 400:
                    await resp.aread()
                    self._check(x, resp)
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise APIError(502, f"expert {k} at {x.url}: {chunk['error'].get('message')}",
                                       type="expert_error")
                    yield chunk
        except httpx.HTTPError as e:
            raise self._down(x, e) from None
