"""Prometheus metrics of one server (its own registry, so several servers can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("smalltalk_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.latency = Histogram("smalltalk_request_seconds", "Request latency (to the last byte)", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("smalltalk_tokens", "Tokens processed", ["kind"], registry=r)
        self.expert_requests = Counter("smalltalk_expert_requests", "Prompts routed to each expert", ["expert"],
                                       registry=r)
        self.routing_seconds = Histogram("smalltalk_routing_seconds", "Time to route one batch of prompts",
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("smalltalk_batch_size", "Rows advanced by one decode step of one expert",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.queue_depth = Gauge("smalltalk_queue_depth", "Prompts waiting to be routed or decoded", registry=r)
        self.active = Gauge("smalltalk_active_requests", "Requests being answered", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
