"""The inference loop of the server: one thread that routes and decodes for every request.

Requests arrive as `Job`s from the HTTP handlers (asyncio) and go back as events on each job's
asyncio queue. The loop:

1. waits for a job, then `batch_window_ms` for company, and takes every job that has arrived;
2. routes all of them together (one batched forward of the E routers, paper Eq. 4-8); a job whose
   expert is remote gets its route and is done here (the handler forwards it);
3. picks the expert whose oldest waiting job is oldest and decodes up to `max_batch_size` of its
   jobs as one batch (`BatchDecoder`: each row masked as if alone, rows leave as they finish, each
   with its own sampling settings, token budget and stop strings).

Jobs that arrive during a batch wait for the next one (dynamic batching). With batching off, jobs
are routed and decoded one at a time, in arrival order. A job whose client went away is dropped at
the next decoding step.

Events, in order: ("route", Route), then either ("remote",) or [("prompt", entries)] ("token",
id, text, logprob entry | None)* ("done", finish reason, remaining text, tokens not sent as events);
or ("error", status, message) at any point. Token events are sent only to streaming requests and to
requests that asked for logprobs; the others get their whole text with "done".
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import SmallTalkError
from ..mixture.inference import Route
from ..model.generate import BatchDecoder, Sampling
from .config import ServeConfig
from .models import ServedModels
from ..model.generate import REPLACEMENT, decode
from .text import TextStream, prompt_logprobs, token_text, top_entries

log = logging.getLogger(__name__)


@dataclass
class Job:
    route_ids: list[int]
    """The whole prompt: routing reads its first M-hat tokens."""
    ids: list[int]
    """What the expert sees (the prompt, or its last tokens when truncated)."""
    max_tokens: int
    sampling: Sampling
    stop: list[str]
    logprobs: int | None
    echo: bool
    expert: int | None
    """Forced expert (the request named it); None: route."""
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    ignore_eos: bool = False
    stream: bool = False
    """The client reads tokens as they come (else it gets the text once, at the end)."""
    cancelled: bool = False
    route: object = None
    enqueued: float = field(default_factory=time.perf_counter)

    def emit(self, *event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Engine:
    def __init__(self, served: ServedModels, cfg: ServeConfig, metrics=None):
        self.served, self.cfg, self.metrics = served, cfg, metrics
        self.inbox: queue.Queue[Job | None] = queue.Queue()
        self.waiting: dict[int, deque[Job]] = {}
        self._thread = threading.Thread(target=self._run, name="smalltalk-engine", daemon=True)
        self._stopping = False
        self._alone = 0  # consecutive collections that found a single job

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self.inbox.put(None)
        self._thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        if self._stopping:
            job.emit("error", 503, "the server is shutting down")
            return
        self.inbox.put(job)

    @property
    def depth(self) -> int:
        """Jobs not yet being decoded."""
        return self.inbox.qsize() + sum(len(q) for q in self.waiting.values())

    # -- the loop ------------------------------------------------------------------------------------

    def _run(self) -> None:
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        while not self._stopping:
            try:
                self._admit(self._collect())
                self._decode_next()
            except Exception as e:  # a bug must not kill the loop: fail the jobs at hand, keep serving
                log.exception("engine loop error")
                for q in self.waiting.values():
                    while q:
                        q.popleft().emit("error", 500, f"internal error: {type(e).__name__}: {e}")

    def _collect(self) -> list[Job]:
        jobs: list[Job] = []
        block = not any(self.waiting.values())
        try:
            first = self.inbox.get(timeout=0.5) if block else self.inbox.get_nowait()
        except queue.Empty:
            return jobs
        if first is None:
            return jobs
        jobs.append(first)
        # Wait for company only when requests have been arriving together: a lone client (concurrency 1)
        # would otherwise pay the window on every request.
        if self.cfg.batching and not (self._alone >= 3 and self.inbox.empty()):
            deadline = time.perf_counter() + self.cfg.batch_window_ms / 1000
            while (remaining := deadline - time.perf_counter()) > 0 or not self.inbox.empty():
                try:
                    job = self.inbox.get(timeout=remaining) if remaining > 0 else self.inbox.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    break
                jobs.append(job)
        self._alone = self._alone + 1 if len(jobs) == 1 else 0
        return jobs

    def _admit(self, jobs: list[Job]) -> None:
        jobs = [j for j in jobs if not j.cancelled]
        to_route = [j for j in jobs if j.expert is None]
        if to_route:
            start = time.perf_counter()
            try:
                routes = self.served.route([j.route_ids for j in to_route])
            except SmallTalkError as e:
                for j in to_route:
                    j.emit("error", 503, f"cannot route: {e}")
                jobs = [j for j in jobs if j.expert is not None]
                routes = []
            if self.metrics:
                self.metrics.routing_seconds.observe(time.perf_counter() - start)
            for j, r in zip(to_route, routes):
                j.route = r
        for j in jobs:
            if j.route is None:  # the request named its expert
                j.route = Route(j.expert, np.zeros(self.served.num_experts), 0, len(j.route_ids))
            e = j.route.expert
            j.emit("route", j.route)
            if self.metrics:
                self.metrics.expert_requests.labels(expert=str(e)).inc()
            if e in self.served.remote:
                j.emit("remote")
            else:
                self.waiting.setdefault(e, deque()).append(j)

    def _decode_next(self) -> None:
        for q in self.waiting.values():
            while q and q[0].cancelled:
                q.popleft()
        ready = [(q[0].enqueued, e) for e, q in self.waiting.items() if q]
        if not ready:
            return
        _, e = min(ready)
        q = self.waiting[e]
        size = self.cfg.max_batch_size if self.cfg.batching else 1
        batch = [q.popleft() for _ in range(min(size, len(q)))]
        if self.metrics:
            self.metrics.batch_size.observe(len(batch))
        try:
            self._decode(e, batch)
        except SmallTalkError as err:
            for j in batch:
                j.emit("error", 503, f"expert {e} is unavailable: {err}")

    @torch.inference_mode()
    def _decode(self, e: int, jobs: list[Job]) -> None:
        served = self.served
        tok = served.tokenizer
        model = served.expert(e)
        for j in jobs:
            if j.echo:
                entries = prompt_logprobs(model, tok, j.ids, j.logprobs or 0)
                j.emit("prompt", [(token_text(tok, t), lp, top) for t, (lp, top) in zip(j.ids, entries)])
        for j in jobs:
            if j.max_tokens == 0:
                j.emit("done", "length", "", 0)
        jobs = [j for j in jobs if j.max_tokens > 0]
        if not jobs:
            return
        decoder = BatchDecoder(model, [j.ids or [served.eos_id] for j in jobs], [j.sampling for j in jobs])
        # Per-token work only where a client sees tokens (streams, logprobs) or a stop string must be watched;
        # a plain request gets its text decoded once at the end.
        streams = [TextStream(tok, j.stop) if (j.stream or j.stop or j.logprobs is not None) else None for j in jobs]
        ids: list[list[int]] = [[] for _ in jobs]

        def done(b: int, reason: str) -> None:
            decoder.finish(b)
            j, stream = jobs[b], streams[b]
            if stream is None:
                j.emit("done", reason, decode(tok, ids[b]).rstrip(REPLACEMENT), len(ids[b]))
            elif j.stream or j.logprobs is not None:
                j.emit("done", reason, stream.finish(), 0)
            else:  # watched for stop strings only: the whole (cut) text at once
                j.emit("done", reason, stream.text.rstrip(REPLACEMENT), len(ids[b]))
            if self.metrics:
                self.metrics.tokens.labels(kind="completion").inc(len(ids[b]))

        while decoder.active:
            for b, token, logits in decoder.step():
                j, stream = jobs[b], streams[b]
                if j.cancelled:  # the client went away: count what was generated, stop
                    decoder.finish(b)
                    if self.metrics:
                        self.metrics.tokens.labels(kind="completion").inc(len(ids[b]))
                    continue
                if token == served.eos_id and not j.ignore_eos:
                    done(b, "stop")
                    continue
                ids[b].append(token)
                if stream is not None:
                    text = stream.add(token)
                    if j.stream or j.logprobs is not None:
                        entry = None
                        if j.logprobs is not None:
                            logp = torch.log_softmax(logits.float(), dim=-1)
                            entry = (token_text(tok, token), float(logp[token]), top_entries(tok, logp, j.logprobs))
                        j.emit("token", token, text, entry)
                    if stream.stopped:
                        done(b, "stop")
                        continue
                if len(ids[b]) >= j.max_tokens:
                    done(b, "length")
