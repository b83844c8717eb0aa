"""Prometheus metrics of the server (its own registry: several apps in one process stay apart)."""
from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    def __init__(self, engine):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("gpt2ja_requests", "HTTP requests answered", ["route", "status"], registry=r)
        self.latency_seconds = Histogram("gpt2ja_request_latency_seconds",
                                         "time from a request's arrival to its last byte", ["route"],
                                         buckets=BUCKETS, registry=r)
        self.ttft = Histogram("gpt2ja_time_to_first_token_seconds", "time from a sample's submission to its first "
                              "text (non-streaming: to its first token drawn)", buckets=BUCKETS, registry=r)
        self.in_progress = Gauge("gpt2ja_requests_in_progress", "HTTP requests being answered", ["route"], registry=r)
        self.tokens = Counter("gpt2ja_tokens_generated", "tokens drawn by the decoding loop", registry=r)
        Gauge("gpt2ja_queue_length", "samples waiting for a place in the batch",
              registry=r).set_function(lambda: engine.queue_length)
        Gauge("gpt2ja_batch_rows", "samples being decoded", registry=r).set_function(lambda: engine.active_rows)
        Gauge("gpt2ja_batch_rows_held", "samples whose stream's client is behind: nothing drawn until it reads",
              registry=r).set_function(lambda: engine.held_rows)
        Gauge("gpt2ja_tokens_per_second", "tokens drawn per second over the last 5 seconds",
              registry=r).set_function(engine.tokens_per_second)
        engine.on_step = self.tokens.inc

    def request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        if route not in ("/v1/completions", "/v1/chat/completions"):  # these record their own (streams end later)
            self.latency_seconds.labels(route).observe(seconds)

    def latency(self, route: str, seconds: float) -> None:
        self.latency_seconds.labels(route).observe(seconds)

    def first_token(self, job) -> None:
        """At a sample's first text event, or when it is done (a sample without text events: the
        time its first token was drawn)."""
        if not getattr(job, "ttft_recorded", False):
            job.ttft_recorded = True
            at = job.first_token_at if not job.text_events and job.first_token_at is not None else time.monotonic()
            self.ttft.observe(at - job.submitted)

    def render(self):
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
