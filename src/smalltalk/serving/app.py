"""`smalltalk serve`: an OpenAI-compatible HTTP API over a mixture bundle (or one model directory).

    from smalltalk.serving import ServeConfig, serve
    serve(ServeConfig(path="runs/quickstart/bundle", port=8000))

Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health,
GET /metrics (Prometheus), and vLLM's tokenizer endpoints (GET /tokenizer_info, POST /tokenize,
POST /detokenize), which lm-eval's ``local-completions`` model uses to tokenize on the server.

Every prompt is routed by its own prefix (paper Eq. 4-8) unless `model` names one expert
(``NAME/expert-K``). The decision comes back in the ``smalltalk.routes`` field of the response
(expert, posterior over experts, prefix tokens used, fallback) and in the ``X-Smalltalk-Expert``
header (one index per prompt, comma-separated).

Semantics that OpenAI leaves open:
- an empty prompt ("") has no routing evidence: it goes to the bundle's fallback expert (the one with
  the largest training share) and generation starts from EOS;
- finish_reason is "stop" for EOS or a stop string, "length" when max_tokens ran out;
- logprobs are those of the model's distribution before temperature / top_p; ``echo`` with
  ``max_tokens=0`` scores the prompt only; text_offset counts the characters of the token strings;
- a prompt longer than the context is refused (400) unless the server runs with --long-prompt
  truncate (then the expert sees its last tokens; routing still reads its first ones).
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from ..model.generate import Sampling, decode
from .config import ServeConfig
from .engine import Engine, Job
from .events import Done, Failed, PromptLogprobs, Remote, Token
from .metrics import Metrics
from .models import ServedModels
from .protocol import CHAT_STOP, APIError, ChatRequest, CompletionRequest, parse
from .remote import RemoteExperts

log = logging.getLogger(__name__)

CHAT_TEMPLATE = ("{% for m in messages %}{{ {'system': 'System', 'user': 'User', 'assistant': 'Assistant'}[m.role] }}: "
                 "{{ m.content }}\n{% endfor %}Assistant:")


@dataclass
class Piece:
    """A part of one choice's answer: text and, when asked, its tokens' logprobs."""

    text: str = ""
    tokens: list = field(default_factory=list)
    token_logprobs: list = field(default_factory=list)
    top_logprobs: list = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0


class Server:
    def __init__(self, cfg: ServeConfig, served: ServedModels | None = None):
        self.cfg = cfg
        self.served = served or ServedModels.open(cfg)
        self.metrics = Metrics()
        self.engine = Engine(self.served, cfg, self.metrics)
        self.remote: RemoteExperts | None = None
        self.active = 0

    # -- requests -> jobs ------------------------------------------------------------------------------

    def resolve_model(self, name: str | None) -> int | None:
        s = self.served
        if name is None or name == s.name:
            return None
        if s.is_mixture:
            for e in range(s.num_experts):
                if name == s.expert_name(e):
                    return e
        raise APIError(404, f"model {name!r} does not exist; GET /v1/models lists {s.name!r} and its experts",
                       param="model", code="model_not_found")

    def prompt_ids(self, i: int, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.served.tokenizer.encode(prompt)
        V = self.served.vocab_size
        bad = [t for t in prompt if not 0 <= t < V]
        if bad:
            raise APIError(400, f"prompt {i}: token id {bad[0]} is outside the vocabulary (size {V})", param="prompt")
        return list(prompt)

    def make_job(self, i: int, prompt, req, expert: int | None, budget: int, stop: list[str],
                 logprobs: int | None = None, echo: bool = False, choice: int = 0) -> Job:
        """The job of choice `choice` of prompt `i`: with a seed, choice k samples with seed + k."""
        ids = self.prompt_ids(i, prompt)
        C = self.served.max_len
        seen = ids
        if len(ids) > C:
            if self.cfg.long_prompt == "error":
                raise APIError(400, f"prompt {i} has {len(ids)} tokens, more than the context of {C}; shorten it, or "
                                    "start the server with --long-prompt truncate", param="prompt",
                               code="context_length_exceeded")
            seen = ids[-C:]
        sampling = Sampling(temperature=req.temperature, top_p=None if req.top_p >= 1 else req.top_p,
                            seed=None if req.seed is None else req.seed + choice)
        return Job(route_ids=ids, ids=seen, max_tokens=budget, sampling=sampling, stop=stop, logprobs=logprobs,
                   echo=echo, expert=expert, loop=asyncio.get_running_loop(), choice=choice)

    async def start(self, job: Job):
        """Submit a job; its routing decision (raises the job's error)."""
        self.engine.submit(job)
        event = await job.events.get()
        if isinstance(event, Failed):
            raise APIError(event.status, event.message,
                           type="server_error" if event.status >= 500 else "invalid_request_error")
        return event.route

    async def pieces(self, job: Job, forward: dict) -> AsyncIterator[Piece]:
        """The answer of a routed job, piece by piece (from the engine, or from a remote expert)."""
        tok = self.served.tokenizer
        while True:
            event = await job.events.get()
            if isinstance(event, Remote):
                async for p in self._remote_pieces(job, forward):
                    yield p
                return
            if isinstance(event, PromptLogprobs):
                entries = event.entries
                yield Piece(text=decode(tok, job.ids), tokens=[e[0] for e in entries],
                            token_logprobs=[e[1] for e in entries], top_logprobs=[e[2] for e in entries])
            elif isinstance(event, Token):
                p = Piece(text=event.text, completion_tokens=1)
                if event.logprob is not None:
                    entry = event.logprob
                    p.tokens, p.token_logprobs, p.top_logprobs = [entry[0]], [entry[1]], [entry[2]]
                yield p
            elif isinstance(event, Done):
                yield Piece(text=event.text, finish_reason=event.finish_reason, completion_tokens=event.completion_tokens)
                return
            elif isinstance(event, Failed):
                raise APIError(event.status, event.message, type="server_error")

    async def _remote_pieces(self, job: Job, forward: dict) -> AsyncIterator[Piece]:
        e = job.route.expert
        body = {**forward, "prompt": job.ids, "seed": job.sampling.seed}
        if forward.get("stream"):
            async for chunk in self.remote.stream(e, body):
                for choice in chunk.get("choices", []):
                    yield _remote_piece(choice, None)
            return
        resp = await self.remote.complete(e, body)
        usage = resp.get("usage") or {}
        yield _remote_piece(resp["choices"][0], usage.get("completion_tokens"))

    # -- completions ----------------------------------------------------------------------------------

    async def completions(self, request: Request) -> object:
        t0 = time.perf_counter()
        req = parse(CompletionRequest, await self.read_body(request))
        expert = self.resolve_model(req.model)
        budget = req.check(self.served.max_len, allow_zero_tokens=req.echo)
        logprobs, stop = req.check_logprobs(), req.stops()
        # Choice index = prompt index x n + k, as the OpenAI API numbers them.
        jobs = [self.make_job(i, p, req, expert, budget, stop, logprobs, req.echo, choice=k)
                for i, p in enumerate(req.prompts()) for k in range(req.n)]
        for j in jobs:
            j.ignore_eos, j.stream = req.ignore_eos, req.stream
        forward = {"max_tokens": budget, "temperature": req.temperature, "top_p": req.top_p, "stop": stop or None,
                   "seed": req.seed, "echo": req.echo, "logprobs": logprobs, "stream": req.stream}
        if req.ignore_eos:
            forward["ignore_eos"] = True
        return await self.answer(jobs, forward, req, t0, "completions")

    async def chat(self, request: Request) -> object:
        t0 = time.perf_counter()
        req = parse(ChatRequest, await self.read_body(request))
        expert = self.resolve_model(req.model)
        prompt = req.render()
        budget = req.check(self.served.max_len)
        stop = req.stops() + list(CHAT_STOP)
        jobs = [self.make_job(0, prompt, req, expert, budget, stop, choice=k) for k in range(req.n)]
        for j in jobs:
            j.stream = req.stream
        forward = {"max_tokens": budget, "temperature": req.temperature, "top_p": req.top_p, "stop": stop,
                   "seed": req.seed, "stream": req.stream}
        return await self.answer(jobs, forward, req, t0, "chat")

    async def answer(self, jobs: list[Job], forward: dict, req, t0: float, endpoint: str) -> object:
        self.active += 1
        self.metrics.active.set(self.active)
        streaming = False
        try:
            routes = await asyncio.gather(*(self.start(j) for j in jobs))
            self.metrics.tokens.labels(kind="prompt").inc(sum(len(j.ids) for j in jobs if j.choice == 0))
            head = {"id": f"{'chatcmpl' if endpoint == 'chat' else 'cmpl'}-{uuid.uuid4().hex}",
                    "created": int(time.time()), "model": req.model or self.served.name}
            extra = {"routes": [self.route_info(i, r) for i, r in enumerate(routes)]}
            headers = {"X-Smalltalk-Expert": ",".join(str(r.expert) for r in routes)}
            if req.stream:
                streaming = True
                gen = self.stream(jobs, forward, head, extra, endpoint, t0,
                                  include_usage=bool((req.stream_options or {}).get("include_usage")))
                return StreamingResponse(gen, media_type="text/event-stream", headers=headers)
            answers = await asyncio.gather(*(self.collect(j, forward) for j in jobs))
            body = self.final_body(jobs, answers, head, extra, endpoint)
            self.metrics.latency.labels(endpoint=endpoint).observe(time.perf_counter() - t0)
            return JSONResponse(body, headers=headers)
        finally:
            if not streaming:
                self.finish(jobs)

    def finish(self, jobs: list[Job]) -> None:
        for j in jobs:
            j.cancelled = True  # a job still running (an error elsewhere, a client gone) stops decoding
        self.active -= 1
        self.metrics.active.set(self.active)

    async def collect(self, job: Job, forward: dict) -> Piece:
        total = Piece()
        async for p in self.pieces(job, forward):
            total.text += p.text
            total.tokens += p.tokens
            total.token_logprobs += p.token_logprobs
            total.top_logprobs += p.top_logprobs
            total.completion_tokens += p.completion_tokens
            total.finish_reason = p.finish_reason or total.finish_reason
        return total

    def route_info(self, i: int, route) -> dict:
        return {"index": i, "expert": int(route.expert), "expert_model": self.served.expert_name(route.expert),
                "posterior": [round(float(p), 6) for p in route.posterior] if route.num_tokens else None,
                "prefix_tokens": int(route.num_tokens), "fallback": bool(route.fallback),
                "remote": route.expert in self.served.remote}

    def final_body(self, jobs: list[Job], answers: list[Piece], head: dict, extra: dict, endpoint: str) -> dict:
        choices = []
        for i, a in enumerate(answers):
            if endpoint == "chat":
                choices.append({"index": i, "message": {"role": "assistant", "content": a.text},
                                "finish_reason": a.finish_reason, "logprobs": None})
            else:
                choices.append({"index": i, "text": a.text, "finish_reason": a.finish_reason,
                                "logprobs": _logprobs_block(a) if jobs[i].logprobs is not None else None})
        prompt_tokens = sum(len(j.ids) for j in jobs if j.choice == 0)
        completion = sum(a.completion_tokens for a in answers)
        return {**head, "object": "chat.completion" if endpoint == "chat" else "text_completion", "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                          "total_tokens": prompt_tokens + completion}, "smalltalk": extra}

    async def stream(self, jobs: list[Job], forward: dict, head: dict, extra: dict, endpoint: str, t0: float,
                     include_usage: bool) -> AsyncIterator[str]:
        out: asyncio.Queue = asyncio.Queue()
        obj = "chat.completion.chunk" if endpoint == "chat" else "text_completion"

        async def pump(i: int, job: Job) -> None:
            try:
                async for p in self.pieces(job, forward):
                    await out.put((i, p))
            except APIError as e:
                await out.put((i, e))
            finally:
                await out.put((i, None))

        tasks = [asyncio.create_task(pump(i, j)) for i, j in enumerate(jobs)]
        completion = 0
        try:
            if endpoint == "chat":
                yield _sse({**head, "object": obj, "smalltalk": extra,
                            "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                         "finish_reason": None} for i in range(len(jobs))]})
            remaining, first = len(jobs), endpoint != "chat"
            while remaining:
                i, item = await out.get()
                if item is None:
                    remaining -= 1
                    continue
                if isinstance(item, APIError):
                    yield _sse(item.body())
                    break
                if not item.text and not item.finish_reason and not item.tokens:
                    continue
                completion += item.completion_tokens
                if endpoint == "chat":
                    choice = {"index": i, "delta": {"content": item.text} if item.text else {},
                              "finish_reason": item.finish_reason}
                else:
                    choice = {"index": i, "text": item.text, "finish_reason": item.finish_reason,
                              "logprobs": _logprobs_block(item) if jobs[i].logprobs is not None else None}
                chunk = {**head, "object": obj, "choices": [choice]}
                if first:  # the routing decision rides on the first chunk
                    chunk["smalltalk"], first = extra, False
                yield _sse(chunk)
            if include_usage:
                prompt_tokens = sum(len(j.ids) for j in jobs if j.choice == 0)
                yield _sse({**head, "object": obj, "choices": [],
                            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                                      "total_tokens": prompt_tokens + completion}})
            yield "data: [DONE]\n\n"
            self.metrics.latency.labels(endpoint=endpoint).observe(time.perf_counter() - t0)
        finally:
            for t in tasks:
                t.cancel()
            self.finish(jobs)

    # -- plumbing -------------------------------------------------------------------------------------

    async def read_body(self, request: Request) -> object:
        limit = self.cfg.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"request body of {declared} bytes is over the limit of {limit} bytes",
                           code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"request body is over the limit of {limit} bytes", code="request_too_large")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON ({e})") from None

    def tokenize(self, body: object) -> dict:
        if not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
            raise APIError(400, "prompt: give the text to tokenize as a string", param="prompt")
        tok, text = self.served.tokenizer, body["prompt"]
        special = tok.special_token_id(text)
        ids = [special] if special is not None else tok.encode(text)
        return {"tokens": ids, "count": len(ids), "max_model_len": self.served.max_len}

    def detokenize(self, body: object) -> dict:
        tokens = body.get("tokens") if isinstance(body, dict) else None
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            raise APIError(400, "tokens: give a list of token ids", param="tokens")
        return {"prompt": decode(self.served.tokenizer, self.prompt_ids(0, tokens))}

    def models(self) -> dict:
        s, created = self.served, int(time.time())
        data = [{"id": s.name, "object": "model", "created": created, "owned_by": "smalltalk",
                 "max_model_len": s.max_len, "smalltalk": {"kind": "mixture" if s.is_mixture else "model",
                                                           "experts": s.num_experts, "prefix_len": s.prefix_len}}]
        if s.is_mixture:
            data += [{"id": s.expert_name(e), "object": "model", "created": created, "owned_by": "smalltalk",
                      "parent": s.name, "max_model_len": s.max_len,
                      "smalltalk": {"expert": e, "remote": s.remote[e].url if e in s.remote else None}}
                     for e in range(s.num_experts)]
        return {"object": "list", "data": data}

    def health(self) -> dict:
        s = self.served
        return {"status": "ok", "model": s.name, "kind": "mixture" if s.is_mixture else "model",
                "experts": s.num_experts, "remote_experts": {str(k): x.url for k, x in s.remote.items()},
                "active_requests": self.active, "queue_depth": self.engine.depth}


def _remote_piece(choice: dict, completion_tokens: int | None) -> Piece:
    lp = choice.get("logprobs") or {}
    tokens = lp.get("tokens") or []
    return Piece(text=choice.get("text") or "", tokens=list(tokens), token_logprobs=list(lp.get("token_logprobs") or []),
                 top_logprobs=list(lp.get("top_logprobs") or []), finish_reason=choice.get("finish_reason"),
                 completion_tokens=completion_tokens if completion_tokens is not None else (len(tokens) or 1))


def _logprobs_block(p: Piece) -> dict:
    offsets, at = [], 0
    for t in p.tokens:
        offsets.append(at)
        at += len(t)
    return {"tokens": p.tokens, "token_logprobs": p.token_logprobs, "top_logprobs": p.top_logprobs,
            "text_offset": offsets}


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(cfg: ServeConfig, served: ServedModels | None = None) -> FastAPI:
    server = Server(cfg, served)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.remote = RemoteExperts(server.served.remote, cfg.expert_timeout_s)
        server.engine.start()
        try:
            yield
        finally:
            server.engine.stop()
            await server.remote.aclose()

    app = FastAPI(title="smalltalk", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server

    def authorize(request: Request) -> None:
        if cfg.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if given != f"Bearer {cfg.api_key}":
            raise APIError(401, "missing or wrong API key; send 'Authorization: Bearer <key>'",
                           type="authentication_error", code="invalid_api_key")

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.exception("request failed")
        return JSONResponse(APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error").body(),
                            status_code=500)

    @app.middleware("http")
    async def count(request: Request, call_next):
        response = await call_next(request)
        server.metrics.requests.labels(endpoint=request.url.path, status=str(response.status_code)).inc()
        server.metrics.queue_depth.set(server.engine.depth)
        return response

    auth = [Depends(authorize)]

    @app.get("/health")
    async def health():
        return server.health()

    @app.get("/v1/models", dependencies=auth)
    async def models():
        return server.models()

    @app.get("/metrics", dependencies=auth)
    async def metrics():
        server.metrics.queue_depth.set(server.engine.depth)
        return PlainTextResponse(server.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions", dependencies=auth)
    async def completions(request: Request):
        return await server.completions(request)

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat(request: Request):
        return await server.chat(request)

    @app.get("/tokenizer_info", dependencies=auth)
    async def tokenizer_info():
        tok = server.served.tokenizer
        eos = tok.spelling(tok.eos_id)
        # No BOS: documents were packed after EOS, so EOS is the start-of-text context (lm-eval uses it).
        return {"eos_token": eos, "bos_token": None, "pad_token": eos, "model_max_length": server.served.max_len,
                "tokenizer_class": "smalltalk", "chat_template": CHAT_TEMPLATE}

    @app.post("/tokenize", dependencies=auth)
    async def tokenize(request: Request):
        return server.tokenize(await server.read_body(request))

    @app.post("/detokenize", dependencies=auth)
    async def detokenize(request: Request):
        return server.detokenize(await server.read_body(request))

    return app


def serve(cfg: ServeConfig, log_level: str = "info") -> int:
    """Run the server until SIGINT / SIGTERM; in-flight requests finish first."""
    import uvicorn

    app = create_app(cfg)
    served = app.state.server.served
    remote = f", remote experts {sorted(served.remote)}" if served.remote else ""
    kind = f"mixture of {served.num_experts} experts, M-hat {served.prefix_len}" if served.is_mixture else "one model"
    print(f"serving {served.name} ({kind}{remote}) on http://{cfg.host}:{cfg.port}/v1", flush=True)
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=log_level, timeout_graceful_shutdown=60)
    # uvicorn drains in-flight requests on SIGTERM, then re-raises the signal to the handler that was there
    # before it; this one makes that a normal exit (status 0) instead of death by signal.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    uvicorn.Server(config).run()
    return 0
