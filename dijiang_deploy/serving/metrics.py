"""Prometheus metrics of the server (``GET /metrics``), with ``prometheus_client``.

Names follow vLLM's where one exists (time to first token, time per output
token, end-to-end latency, running and waiting requests), under ``dijiang_``.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_PER_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)


class ServerMetrics:
    """The server's metrics in their own registry (several servers may share a process in tests)."""

    def __init__(self, engine_stats: Callable[[], tuple[int, int]], cache_stats: Callable[[], object | None]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("dijiang_requests", "HTTP requests by route and status code", ["route", "status"], registry=r)
        self.ttft = Histogram("dijiang_time_to_first_token_seconds", "time to the first generated token",
                              buckets=_LATENCY, registry=r)
        self.tpot = Histogram("dijiang_time_per_output_token_seconds", "mean time per output token after the first",
                              buckets=_PER_TOKEN, registry=r)
        self.itl = Histogram("dijiang_inter_token_latency_seconds", "time between consecutive tokens of a request",
                             buckets=_PER_TOKEN, registry=r)
        self.e2e = Histogram("dijiang_e2e_request_latency_seconds", "submit to last token", buckets=_LATENCY, registry=r)
        self.prompt_tokens = Counter("dijiang_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.cached_tokens = Counter("dijiang_cached_prompt_tokens", "prompt tokens resumed from the state cache", registry=r)
        self.generation_tokens = Counter("dijiang_generation_tokens", "generated tokens", registry=r)
        running = Gauge("dijiang_requests_running", "requests in the engine's lanes", registry=r)
        waiting = Gauge("dijiang_requests_waiting", "requests queued for a lane", registry=r)
        running.set_function(lambda: engine_stats()[0])
        waiting.set_function(lambda: engine_stats()[1])
        r.register(_CacheCollector(cache_stats))

    def observe(self, output) -> None:
        """Record a finished :class:`~dijiang_deploy.runtime.RequestOutput`."""
        self.prompt_tokens.inc(output.prompt_tokens)
        self.cached_tokens.inc(output.cached_tokens)
        self.generation_tokens.inc(output.completion_tokens)
        self.e2e.observe(output.total_seconds)
        times = output.token_seconds
        if output.first_token_seconds is not None:
            self.ttft.observe(output.first_token_seconds)
        if len(times) > 1:
            self.tpot.observe((times[-1] - times[0]) / (len(times) - 1))
            for a, b in zip(times[:-1], times[1:]):
                self.itl.observe(b - a)


class _CacheCollector:
    """State-cache counters, read from the cache's own stats at scrape time."""

    def __init__(self, stats: Callable[[], object | None]):
        self._stats = stats

    def collect(self):
        s = self._stats()
        if s is None:
            return
        for name, value, help_text in (
            ("dijiang_state_cache_hits", s.hits, "requests resumed from a cached state"),
            ("dijiang_state_cache_misses", s.misses, "requests with no cached prefix"),
            ("dijiang_state_cache_evictions", s.evictions, "states dropped from memory by the LRU"),
        ):
            c = CounterMetricFamily(name, help_text)
            c.add_metric([], value)
            yield c
        g = GaugeMetricFamily("dijiang_state_cache_bytes", "bytes of states held in memory")
        g.add_metric([], s.bytes)
        yield g
        g = GaugeMetricFamily("dijiang_state_cache_entries", "states held in memory")
        g.add_metric([], s.entries)
        yield g
