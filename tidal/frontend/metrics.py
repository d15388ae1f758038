"""Prometheus metrics of one frontend app, on the app's own registry.

Counters and latency histograms are updated by the serving code as requests run; the engine
gauges (running, waiting, KV blocks) are read from `engine.stats()` when `/metrics` is
scraped, so they are never stale by more than one engine step. Each `FrontendMetrics` owns a
`CollectorRegistry`, so several apps (tests) can live in one process.

In multiprocess mode (`metrics_multiprocess`: several frontend processes on one port) the counters
and histograms are file-backed and a scrape renders every process's, merged, plus this process's
scrape-time collectors (engine gauges, the router's per-worker gauges).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tidal.frontend.engine_client import EngineClient
from tidal.frontend.metrics_multiprocess import merged_registry, multiprocess_directory

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Seconds; LLM latencies span a few ms (one decode step) to minutes (long generations).
TTFT_BUCKETS_S = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                  1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0)
ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075,
                 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
E2E_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0,
                 60.0, 90.0, 120.0, 180.0, 300.0, 600.0)

REQUEST_STATUSES = ("success", "error", "abort", "rejected")


class _EngineStatsCollector(Collector):
    """Engine gauges, read from the engine's latest stats at scrape time."""

    def __init__(self, engine: EngineClient) -> None:
        self._engine = engine

    def collect(self) -> Iterator[Metric]:
        stats = self._engine.stats()
        values = {
            "tidal_running_requests": ("Requests running in the engine.",
                                       stats.num_running if stats else 0),
            "tidal_waiting_requests": ("Requests waiting in the engine's queue.",
                                       stats.num_waiting if stats else 0),
            "tidal_kv_blocks_used": ("KV cache blocks held by requests.",
                                     stats.kv_blocks_used if stats else 0),
            "tidal_kv_blocks_total": ("KV cache blocks in the pool.",
                                      stats.kv_blocks_total if stats else 0),
        }
        for name, (doc, value) in values.items():
            yield GaugeMetricFamily(name, doc, value=value)


class FrontendMetrics:
    def __init__(self, engine: EngineClient) -> None:
        self._engine = engine
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("tidal_requests", "Requests by how they ended (rejected: refused by the "
                                "router's admission).", ["status"], registry=r)
        for status in REQUEST_STATUSES:
            self.requests.labels(status)
        self.ttft_s = Histogram("tidal_request_ttft_seconds", "Time to first token.",
                                buckets=TTFT_BUCKETS_S, registry=r)
        self.itl_s = Histogram("tidal_request_itl_seconds",
                               "Time between consecutive engine outputs of a request.",
                               buckets=ITL_BUCKETS_S, registry=r)
        self.e2e_s = Histogram("tidal_request_e2e_seconds",
                               "Time from arrival to the last token of successful requests.",
                               buckets=E2E_BUCKETS_S, registry=r)
        self.prompt_tokens = Counter("tidal_prompt_tokens", "Prompt tokens of requests.",
                                     registry=r)
        self.generation_tokens = Counter("tidal_generation_tokens", "Tokens generated.",
                                         registry=r)
        self.prefix_cache_hit_tokens = Counter(
            "tidal_prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache.",
            registry=r)
        self._engine_stats = _EngineStatsCollector(engine)
        r.register(self._engine_stats)

    def render(self) -> bytes:
        """This app's metrics, then the engine client's own (a router's), if it has a registry.

        Multiprocess mode: every process's file-backed metrics, merged, then this process's
        scrape-time collectors (the engine client lists its own in `live_collectors`)."""
        if multiprocess_directory() is not None:
            live = (self._engine_stats, *getattr(self._engine, "live_collectors", ()))
            return generate_latest(merged_registry(*live))
        extra = getattr(self._engine, "registry", None)
        return generate_latest(self.registry) + (generate_latest(extra) if extra is not None else b"")
