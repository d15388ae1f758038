"""The router's Prometheus metrics: one registry per router, and the collectors on it.

Owns the registry, the file-backable counters, gauges and histograms the router's parts update
(routing decisions, admission, stages of a request, migrations, KV-index resyncs), and the
scrape-time per-worker gauges and counters and the pool sizes (`WorkerGauges`, read from the workers'
latest load reports).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from tidal.protocol import ROLES
from tidal.router.migration import REASONS as MIGRATION_REASONS

STAGE_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                   30.0, 60.0)
DECISION_BUCKETS_S = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1)
OVERLAP_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self._stages(r)
        self.decisions = Counter("tidal_router_decisions", "Routing decisions, by the policy that made them "
                                 "(`session`: a session's worker kept).", ["policy"], registry=r)
        self.overlap_blocks = Histogram("tidal_router_overlap_blocks", "Prompt blocks the chosen worker "
                                        "already held.", buckets=OVERLAP_BUCKETS, registry=r)
        # Each frontend process's router replica has its own queue: they add up, and a dead one's drops.
        self.queue_depth = Gauge("tidal_router_queue_depth", "Requests waiting in the router for a worker "
                                 "with room.", registry=r, multiprocess_mode="livesum")
        self.rejected = Counter("tidal_router_rejected", "Requests refused with 503: queue full or waited too "
                                "long.", ["reason"], registry=r)
        for reason in ("queue_full", "queue_timeout"):
            self.rejected.labels(reason)
        self.resyncs = Counter("tidal_router_resyncs", "Times a worker's KV index was rebuilt from a dump "
                               "(new worker, restarted worker, or a gap in its events).", registry=r)
        self.migrations = Counter("tidal_request_migrations", "Requests moved to another worker mid-stream, "
                                  "by why their worker went away.", ["reason"], registry=r)
        for reason in MIGRATION_REASONS:
            self.migrations.labels(reason)
        self.decision_s = Histogram("tidal_router_decision_seconds", "Time to route one request (hashing, "
                                    "index lookup, policy).", buckets=DECISION_BUCKETS_S, registry=r)
        self.live_collectors: tuple = ()

    def _stages(self, r: CollectorRegistry) -> None:
        """Where prompts prefill, and the time each stage of a request takes."""
        self.prefill_decisions = Counter("tidal_prefill_decisions", "Where prompts were prefilled "
                                         "(conditional disaggregation).", ["where"], registry=r)
        for where in ("local", "remote"):
            self.prefill_decisions.labels(where)
        self.prefill_fallbacks = Counter("tidal_prefill_fallbacks", "Remote prefills that fell back to "
                                         "local because the prefill worker died.", registry=r)
        self.queue_s = Histogram("tidal_request_queue_seconds", "Time from arrival at a worker to the "
                                 "request's first step there.", buckets=STAGE_BUCKETS_S, registry=r)
        self.prefill_s = Histogram("tidal_request_prefill_seconds", "Remote prefill time (after queueing), "
                                   "as the router sees it.", buckets=STAGE_BUCKETS_S, registry=r)
        self.kv_transfer_s = Histogram("tidal_request_kv_transfer_seconds", "Time the decode worker spent "
                                       "pulling a request's KV.", buckets=STAGE_BUCKETS_S, registry=r)
        self.first_decode_s = Histogram("tidal_request_first_decode_seconds", "From handing a request to its "
                                        "decode worker to its next token, transfer excluded.",
                                        buckets=STAGE_BUCKETS_S, registry=r)

    def watch_workers(self, workers: Mapping) -> None:
        """Per-worker gauges over `workers` (worker id -> `Worker`), read at scrape time. Scrape-time and
        never file-backed: multiprocess `/metrics` renders this process's alone."""
        gauges = WorkerGauges(workers)
        self.registry.register(gauges)
        self.live_collectors = (gauges,)


class WorkerGauges:
    """Per-worker gauges and counters from the latest load reports, and the pool sizes, read at scrape
    time (never file-backed: every router replica sees the same reports, so in multiprocess mode the
    scraping process's alone render). The counters are the workers' own cumulative ones: they restart
    from zero with a restarted worker, which Prometheus's `rate()` takes as a reset."""

    GAUGES: ClassVar[dict[str, tuple[str, str]]] = {
        "tidal_worker_kv_blocks_used": ("kv_blocks_used", "KV blocks in use on the worker (held ones included)."),
        "tidal_worker_kv_blocks_total": ("kv_blocks_total", "KV blocks in the worker's pool."),
        "tidal_worker_running_requests": ("num_running", "Requests running on the worker."),
        "tidal_worker_waiting_requests": ("num_waiting", "Requests queued on the worker."),
        "tidal_worker_waiting_for_kv": ("num_waiting_for_kv", "Requests pulling their KV on the worker."),
        "tidal_worker_held_kv": ("num_held_kv", "Finished prefills whose KV the worker holds for a puller."),
    }
    COUNTERS: ClassVar[dict[str, tuple[str, str]]] = {
        "tidal_worker_preemptions": ("preemptions_total", "Running requests the worker preempted for want of KV."),
        "tidal_worker_prompt_tokens": ("prompt_tokens", "Prompt tokens of the requests the worker took."),
        "tidal_worker_prefix_cache_hit_tokens": ("prefix_cache_hit_tokens", "Prompt tokens it did not compute."),
        "tidal_worker_generation_tokens": ("generation_tokens", "Tokens the worker generated."),
        "tidal_worker_kv_transfers": ("kv_transfers", "KV pulls the worker completed (decode side)."),
        "tidal_worker_kv_transfer_failures": ("kv_transfer_failures", "KV pulls that failed on the worker."),
        "tidal_worker_kv_transfer_bytes": ("kv_transfer_bytes", "Bytes of KV the worker pulled."),
        "tidal_worker_kv_transfer_seconds": ("kv_transfer_seconds", "Seconds the worker spent pulling KV."),
        "tidal_worker_grammar_seconds": ("grammar_seconds_total", "Host seconds in the grammar library "
                                         "(structured output: compiles, masks, accepts)."),
    }
    USAGE = "tidal_worker_kv_usage_ratio"
    STATES = ("routable", "draining", "down")

    def __init__(self, workers: Mapping) -> None:
        self.workers = workers

    def collect(self):
        labels = ["worker_id", "role"]
        gauges = {name: GaugeMetricFamily(name, doc, labels=labels) for name, (_, doc) in self.GAUGES.items()}
        counters = {name: CounterMetricFamily(name, doc, labels=labels) for name, (_, doc) in self.COUNTERS.items()}
        usage = GaugeMetricFamily(self.USAGE, "Fraction of the worker's KV blocks in use (0 to 1).", labels=labels)
        pool = {(role, state): 0 for role in ROLES for state in self.STATES}
        for worker in self.workers.values():
            pool[(worker.client.role, _state(worker))] += 1
            stats = worker.client.stats()
            if stats is None:
                continue
            key = [worker.worker_id, worker.client.role]
            for name, (attr, _) in self.GAUGES.items():
                gauges[name].add_metric(key, getattr(stats, attr))
            for name, (attr, _) in self.COUNTERS.items():
                counters[name].add_metric(key, getattr(stats, attr))
            usage.add_metric(key, stats.kv_blocks_used / stats.kv_blocks_total if stats.kv_blocks_total else 0.0)
        workers = GaugeMetricFamily("tidal_workers", "Workers this router knows, by role and state (routable; "
                                    "draining: leaving or being flipped; down: not connected).",
                                    labels=["role", "state"])
        for (role, state), count in pool.items():
            workers.add_metric([role, state], count)
        yield from gauges.values()
        yield usage
        yield from counters.values()
        yield workers


def _state(worker) -> str:
    if not worker.client.is_healthy():
        return "down"
    return "routable" if worker.routable else "draining"
