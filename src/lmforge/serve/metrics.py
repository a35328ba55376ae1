"""Prometheus metrics of the server (`GET /metrics`, text exposition format).

One `CollectorRegistry` per app (several apps in one process — tests — never collide):

- `lmforge_requests_total{endpoint, status}`: finished HTTP requests by endpoint and status code
  (a stream cut by its client counts as status "499");
- `lmforge_queue_depth`, `lmforge_running_requests`, `lmforge_kv_blocks_used`,
  `lmforge_kv_blocks_total`, `lmforge_prefix_cache_hits`: read from `engine.stats()` at scrape time;
- `lmforge_generated_tokens_total`, `lmforge_prompt_tokens_total`: counters;
- `lmforge_generation_tokens_per_second`: generated tokens per second over the last 10 s;
- `lmforge_time_to_first_token_seconds` and `lmforge_request_duration_seconds`: histograms.
"""

from __future__ import annotations

import collections
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class _EngineCollector:
    def __init__(self, metrics: "Metrics"):
        self.m = metrics

    def collect(self):
        stats = self.m.engine_stats()
        for key, name, doc in (("queue_depth", "lmforge_queue_depth", "requests waiting for a slot"),
                               ("running", "lmforge_running_requests", "requests in the running batch"),
                               ("kv_blocks_used", "lmforge_kv_blocks_used", "KV-cache blocks in use"),
                               ("kv_blocks_total", "lmforge_kv_blocks_total", "KV-cache blocks in the budget"),
                               ("prefix_hits", "lmforge_prefix_cache_hits", "prompt blocks reused from the prefix cache")):
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], float(stats.get(key, 0) or 0))
            yield g
        g = GaugeMetricFamily("lmforge_generation_tokens_per_second", "generated tokens per second over the last 10 s")
        g.add_metric([], self.m.tokens_per_second())
        yield g
        g = GaugeMetricFamily("lmforge_ready", "1 when the model is loaded and the engine serves")
        g.add_metric([], 1.0 if self.m.ready() else 0.0)
        yield g


class Metrics:
    """The server's metrics. `engine_stats` and `ready` are callables read at scrape time."""

    WINDOW = 10.0

    def __init__(self, engine_stats=lambda: {}, ready=lambda: False):
        self.registry = CollectorRegistry()
        self.engine_stats, self.ready = engine_stats, ready
        self.requests = Counter("lmforge_requests", "finished HTTP requests", ["endpoint", "status"],
                                registry=self.registry)
        self.generated = Counter("lmforge_generated_tokens", "tokens generated", registry=self.registry)
        self.prompt = Counter("lmforge_prompt_tokens", "prompt tokens processed", registry=self.registry)
        self.ttft = Histogram("lmforge_time_to_first_token_seconds", "time from request arrival to its first token",
                              buckets=_TTFT_BUCKETS, registry=self.registry)
        self.duration = Histogram("lmforge_request_duration_seconds", "generation request duration",
                                  buckets=_DURATION_BUCKETS, registry=self.registry)
        self._recent: collections.deque = collections.deque()  # (time, tokens)
        self._lock = threading.Lock()
        self.registry.register(_EngineCollector(self))

    def tokens(self, n: int) -> None:
        if n <= 0:
            return
        self.generated.inc(n)
        t = time.monotonic()
        with self._lock:
            self._recent.append((t, n))
            self._trim(t)

    def _trim(self, t: float) -> None:
        while self._recent and self._recent[0][0] < t - self.WINDOW:
            self._recent.popleft()

    def tokens_per_second(self) -> float:
        t = time.monotonic()
        with self._lock:
            self._trim(t)
            return sum(n for _, n in self._recent) / self.WINDOW

    def request(self, endpoint: str, status: int | str) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


__all__ = ["Metrics", "CONTENT_TYPE"]
