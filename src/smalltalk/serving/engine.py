"""The inference loop of the server: one thread that routes and decodes for every request, one token at a time.

Requests arrive as `Job`s from the HTTP handlers (asyncio) and go back as typed events (`events.py`) on each
job's asyncio queue. Scheduling is per iteration (continuous batching, as vLLM, TGI and SGLang do):

1. take every job that has arrived (when nothing is decoding, wait `batch_window_ms` for company if requests
   have been arriving together) and route them all at once (one batched forward of the E routers, paper
   Eq. 4-8); a job whose expert is remote gets its route and is done here (the handler forwards it);
2. let waiting jobs join their expert's batch while it has room (`max_batch_size` rows per expert); a joining
   row is prefilled within the step below;
3. step: every row of every expert gets one token (`ExpertBatch`: a `BatchDecoder` that rows join and leave
   between steps, each with its own sampling settings, token budget and stop strings); a row that finishes
   leaves at once and frees its KV cache.

So no request waits for another request's batch to finish: a short request that arrives while a long one
decodes joins at the next step and leaves when it is done. With batching off, one row decodes at a time, in
arrival order. A job whose client went away is dropped at the next step.

One step is one forward for all local experts: their weights are stacked (`model.stacked.StackedExperts`,
batched matmuls over the experts) and each row goes through its own expert's weights, so a step costs about
what one model's step costs, not E of them (on small models the per-forward overhead dominates: 4 experts x
2 rows measured 0.43 vs 2.8 ms per step on one CPU thread). Experts that cannot be stacked (different
architectures, or `--max-loaded-experts` below the number of local experts) decode one forward per expert.
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
from ..model.generate import REPLACEMENT, BatchDecoder, Sampling, decode
from .config import ServeConfig
from .events import Done, Event, Failed, PromptLogprobs, Remote, Routed, Token
from .models import ServedModels
from .text import TextStream, prompt_logprobs, token_text, top_entries

log = logging.getLogger(__name__)

ROUTE_BATCH = 4
"""Arrivals that are routed at once while rows decode (or fewer, once the oldest has waited batch_window_ms)."""


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
    choice: int = 0
    """Which of the prompt's n choices this job is (its prompt tokens are counted once, with choice 0)."""
    cancelled: bool = False
    route: Route | None = None
    enqueued: float = field(default_factory=time.perf_counter)

    def emit(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


@dataclass
class _Row:
    """A job decoding in a batch."""

    job: Job
    expert: int
    stream: TextStream | None
    """Per-token text: for streams, logprobs and stop strings; None when the text is decoded once at the end."""
    ids: list[int] = field(default_factory=list)


class DecodeBatch:
    """The rows one model is decoding (one expert's `Transformer`, or the local experts' `StackedExperts`,
    where `slot` maps an expert to its index in the stack); rows join and leave between steps."""

    def __init__(self, model, tokenizer, eos_id: int, slot: dict[int, int] | None = None):
        self.model, self.tok, self.eos_id, self.slot = model, tokenizer, eos_id, slot
        self.decoder: BatchDecoder | None = None
        self.rows: dict[int, _Row] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def count(self, expert: int) -> int:
        return sum(1 for r in self.rows.values() if r.expert == expert)

    def add(self, job: Job, expert: int) -> None:
        if self.decoder is None:
            self.decoder = BatchDecoder(self.model, [], [])
        # Per-token work only where a client sees tokens (streams, logprobs) or a stop string must be watched;
        # a plain request gets its text decoded once at the end.
        stream = TextStream(self.tok, job.stop) if (job.stream or job.stop or job.logprobs is not None) else None
        row = self.decoder.add(job.ids or [self.eos_id], job.sampling, self.slot[expert] if self.slot else 0)
        self.rows[row] = _Row(job, expert, stream)

    def step(self, metrics=None) -> None:
        """One token for every row; emits the rows' events and drops the rows that are done."""
        for b, token, logits in self.decoder.step():
            row = self.rows[b]
            j, stream = row.job, row.stream
            if j.cancelled:  # the client went away: count what was generated, stop
                self._leave(b, metrics)
                continue
            if token == self.eos_id and not j.ignore_eos:
                self._done(b, "stop", metrics)
                continue
            row.ids.append(token)
            if stream is not None:
                text = stream.add(token)
                if j.stream or j.logprobs is not None:
                    entry = None
                    if j.logprobs is not None:
                        logp = torch.log_softmax(logits.float(), dim=-1)
                        entry = (token_text(self.tok, token), float(logp[token]), top_entries(self.tok, logp, j.logprobs))
                    j.emit(Token(token, text, entry))
                if stream.stopped:
                    self._done(b, "stop", metrics)
                    continue
            if len(row.ids) >= j.max_tokens:
                self._done(b, "length", metrics)
        if not self.rows:
            self.decoder = None  # nothing left: the next row starts a fresh batch (and cache)

    def _done(self, b: int, reason: str, metrics) -> None:
        row = self.rows[b]
        j, stream = row.job, row.stream
        if stream is None:
            j.emit(Done(reason, decode(self.tok, row.ids).rstrip(REPLACEMENT), len(row.ids)))
        elif j.stream or j.logprobs is not None:
            j.emit(Done(reason, stream.finish(), 0))
        else:  # watched for stop strings only: the whole (cut) text at once
            j.emit(Done(reason, stream.text.rstrip(REPLACEMENT), len(row.ids)))
        self._leave(b, metrics)

    def _leave(self, b: int, metrics) -> None:
        self.decoder.finish(b)
        if metrics:
            metrics.tokens.labels(kind="completion").inc(len(self.rows[b].ids))
        del self.rows[b]

    def fail(self, status: int, message: str) -> None:
        for row in self.rows.values():
            row.job.emit(Failed(status, message))
        self.rows.clear()
        self.decoder = None


class Engine:
    def __init__(self, served: ServedModels, cfg: ServeConfig, metrics=None):
        self.served, self.cfg, self.metrics = served, cfg, metrics
        self.inbox: queue.Queue[Job | None] = queue.Queue()
        self.waiting: dict[int, deque[Job]] = {}
        self.batches: dict[int | str, DecodeBatch] = {}  # "stacked" (all local experts), or per expert
        self._stacked: tuple | None = None  # (StackedExperts, {expert: slot}) once built; () when not stackable
        self._thread = threading.Thread(target=self._run, name="smalltalk-engine", daemon=True)
        self._stopping = False
        self._alone = 0  # consecutive collections that found a single job
        self.unrouted: list[Job] = []  # arrived while decoding, waiting for company to be routed with

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self.inbox.put(None)
        self._thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        if self._stopping:
            job.emit(Failed(503, "the server is shutting down"))
            return
        self.inbox.put(job)

    @property
    def depth(self) -> int:
        """Jobs not yet decoding."""
        return self.inbox.qsize() + len(self.unrouted) + sum(len(q) for q in self.waiting.values())

    @property
    def decoding(self) -> int:
        return sum(len(b) for b in self.batches.values())

    # -- the loop ------------------------------------------------------------------------------------

    def _run(self) -> None:
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        while not self._stopping:
            try:
                self._admit(self._collect())
                self._fill()
                self._step()
            except Exception as e:  # a bug must not kill the loop: fail the jobs at hand, keep serving
                log.exception("engine loop error")
                message = f"internal error: {type(e).__name__}: {e}"
                for q in self.waiting.values():
                    while q:
                        q.popleft().emit(Failed(500, message))
                for batch in self.batches.values():
                    batch.fail(500, message)
                self.batches.clear()

    def _collect(self) -> list[Job]:
        """Jobs to route now. While rows decode, arrivals are routed together once a few have gathered or the
        oldest has waited `batch_window_ms`: under continuous arrivals (one every step or two at concurrency 32)
        routing each alone would cost one router forward per request, several decode steps' worth."""
        if self.decoding or any(self.waiting.values()):
            self.unrouted += self._drain()
            if self.unrouted and (len(self.unrouted) >= ROUTE_BATCH or not self.cfg.batching or
                                  time.perf_counter() - self.unrouted[0].enqueued >= self.cfg.batch_window_ms / 1000):
                jobs, self.unrouted = self.unrouted, []
                return jobs
            return []
        jobs, self.unrouted = self.unrouted, []
        if not jobs:  # idle: block for the next arrival
            try:
                first = self.inbox.get(timeout=0.5)
            except queue.Empty:
                return jobs
            if first is None:
                return jobs
            jobs.append(first)
            # Wait for company only when requests have been arriving together: a lone client (concurrency 1)
            # would otherwise pay the window on every request.
            if self.cfg.batching and not (self._alone >= 3 and self.inbox.empty()):
                deadline = time.perf_counter() + self.cfg.batch_window_ms / 1000
                while (remaining := deadline - time.perf_counter()) > 0:
                    try:
                        job = self.inbox.get(timeout=remaining)
                    except queue.Empty:
                        break
                    if job is None:
                        return jobs
                    jobs.append(job)
        jobs += self._drain()
        self._alone = self._alone + 1 if len(jobs) == 1 else 0
        return jobs

    def _drain(self) -> list[Job]:
        """Everything that has arrived, without waiting."""
        jobs = []
        while True:
            try:
                job = self.inbox.get_nowait()
            except queue.Empty:
                return jobs
            if job is None:
                return jobs
            jobs.append(job)

    def _admit(self, jobs: list[Job]) -> None:
        jobs = [j for j in jobs if not j.cancelled]
        to_route = [j for j in jobs if j.expert is None]
        if to_route:
            start = time.perf_counter()
            try:
                routes = self.served.route([j.route_ids for j in to_route])
            except SmallTalkError as e:
                for j in to_route:
                    j.emit(Failed(503, f"cannot route: {e}"))
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
            j.emit(Routed(j.route))
            if self.metrics:
                self.metrics.expert_requests.labels(expert=str(e)).inc()
            if e in self.served.remote:
                j.emit(Remote())
            else:
                self.waiting.setdefault(e, deque()).append(j)

    def _fill(self) -> None:
        """Waiting jobs join their expert's batch while it has room (with batching off: one row at a time)."""
        for q in self.waiting.values():
            while q and q[0].cancelled:
                q.popleft()
        if not self.cfg.batching:
            ready = [(q[0].enqueued, e) for e, q in self.waiting.items() if q]
            if ready and not self.decoding:
                self._join(min(ready)[1], 1)
            return
        for e, q in self.waiting.items():
            room = self.cfg.max_batch_size - sum(b.count(e) for b in self.batches.values())
            if q and room > 0:
                self._join(e, min(room, len(q)))

    def _stack(self) -> tuple:
        """(StackedExperts of the local experts, {expert: slot}), or () when they cannot be stacked."""
        if self._stacked is None:
            from ..model.stacked import StackedExperts

            local = [e for e in range(self.served.num_experts) if e not in self.served.remote]
            mixture = self.served.mixture
            self._stacked = ()
            if mixture is not None and len(local) > 1 and mixture.max_loaded_experts >= len(local):
                try:
                    models = [self.served.expert(e) for e in local]
                    self._stacked = (StackedExperts(models), {e: i for i, e in enumerate(local)})
                except SmallTalkError as err:  # an expert that does not load, or experts of different shapes
                    log.warning("experts decode one forward each: %s", err)
        return self._stacked

    @torch.inference_mode()
    def _join(self, e: int, count: int) -> None:
        q = self.waiting[e]
        jobs = [q.popleft() for _ in range(count)]
        try:
            model = self.served.expert(e)
            stacked = self._stack()
            key = "stacked" if stacked else e
            batch = self.batches.get(key)
            if batch is None:
                batch = DecodeBatch(stacked[0] if stacked else model, self.served.tokenizer, self.served.eos_id,
                                    stacked[1] if stacked else None)
        except SmallTalkError as err:
            for j in jobs:
                j.emit(Failed(503, f"expert {e} is unavailable: {err}"))
            return
        for j in jobs:
            if j.echo:
                entries = prompt_logprobs(model, batch.tok, j.ids, j.logprobs or 0)
                j.emit(PromptLogprobs([(token_text(batch.tok, t), lp, top) for t, (lp, top) in zip(j.ids, entries)]))
            if j.max_tokens == 0:
                j.emit(Done("length", "", 0))
            else:
                batch.add(j, e)
        if len(batch):
            self.batches[key] = batch

    @torch.inference_mode()
    def _step(self) -> None:
        for e, batch in list(self.batches.items()):
            if self.metrics:
                self.metrics.batch_size.observe(len(batch))
            try:
                batch.step(self.metrics)
            except SmallTalkError as err:  # e.g. NaN logits from damaged weights
                batch.fail(503, f"expert {e} is unavailable: {err}" if e != "stacked" else f"cannot decode: {err}")
            if not len(batch):
                del self.batches[e]
