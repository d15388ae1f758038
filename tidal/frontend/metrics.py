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

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
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
FINISH_REASONS = ("stop", "length", "tool_calls", "abort", "error")
"""The finish reasons a client sees (tool_calls: the chat layer turned the output into tool calls)."""


class _EngineStatsCollector(Collector):
    """Engine gauges, read from the engine's latest stats at scrape time (a router's: summed over its workers)."""

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
            "tidal_kv_cache_usage_ratio": ("Fraction of the KV cache blocks in use (0 to 1).",
                                           stats.kv_blocks_used / stats.kv_blocks_total
                                           if stats and stats.kv_blocks_total else 0.0),
        }
        for name, (doc, value) in values.items():
            yield GaugeMetricFamily(name, doc, value=value)


class FrontendMetrics:
    """The request metrics, each labelled `model_name` (vLLM's convention). The serving code updates the
    children bound to this app's model, resolved here once (`ttft_s`, `requests[status]`, ...), so a
    streamed token costs what it did without the label."""

    def __init__(self, engine: EngineClient, model_name: str = "") -> None:
        self._engine = engine
        self.model_name = model_name
        self.registry = CollectorRegistry()
        r, model = self.registry, ["model_name"]
        requests = Counter("tidal_requests", "Requests by how they ended (rejected: refused by the "
                           "router's admission).", [*model, "status"], registry=r)
        self.requests = {status: requests.labels(model_name, status) for status in REQUEST_STATUSES}
        self._finish_reasons = Counter("tidal_request_finish_reasons", "Finished requests by the finish "
                                       "reason their client saw.", [*model, "finish_reason"], registry=r)
        self.finish_reasons = {reason: self._finish_reasons.labels(model_name, reason) for reason in FINISH_REASONS}
        self.ttft_s = Histogram("tidal_request_ttft_seconds", "Time to first token.", model,
                                buckets=TTFT_BUCKETS_S, registry=r).labels(model_name)
        self.itl_s = Histogram("tidal_request_itl_seconds",
                               "Time between consecutive engine outputs of a request.", model,
                               buckets=ITL_BUCKETS_S, registry=r).labels(model_name)
        self.e2e_s = Histogram("tidal_request_e2e_seconds",
                               "Time from arrival to the last token of successful requests.", model,
                               buckets=E2E_BUCKETS_S, registry=r).labels(model_name)
        self.prompt_tokens = Counter("tidal_prompt_tokens", "Prompt tokens of requests.", model,
                                     registry=r).labels(model_name)
        self.generation_tokens = Counter("tidal_generation_tokens", "Tokens generated.", model,
                                         registry=r).labels(model_name)
        self.prefix_cache_hit_tokens = Counter(
            "tidal_prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache.", model,
            registry=r).labels(model_name)
        self._engine_stats = _EngineStatsCollector(engine)
        r.register(self._engine_stats)

    def count_finish(self, reason: str) -> None:
        """One finished request with this finish reason (a reason outside `FINISH_REASONS` gets its own
        series)."""
        child = self.finish_reasons.get(reason)
        if child is None:
            child = self.finish_reasons[reason] = self._finish_reasons.labels(self.model_name, reason)
        child.inc()

    def render(self) -> bytes:
        """This app's metrics, then the engine client's own (a router's), if it has a registry.

        Multiprocess mode: every process's file-backed metrics, merged, then this process's
        scrape-time collectors (the engine client lists its own in `live_collectors`)."""
        if multiprocess_directory() is not None:
            live = (self._engine_stats, *getattr(self._engine, "live_collectors", ()))
            return generate_latest(merged_registry(*live))
        extra = getattr(self._engine, "registry", None)
        return generate_latest(self.registry) + (generate_latest(extra) if extra is not None else b"")
