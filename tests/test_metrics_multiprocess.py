"""Multiprocess `/metrics`: frontend processes write file-backed metrics; any one renders them all.

Multiprocess mode is process-global, so it is only ever enabled in spawned children; the pytest
process itself stays in single-process mode (checked at the end).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from pathlib import Path

from prometheus_client import values
from prometheus_client.parser import text_string_to_metric_families

from tidal.frontend.metrics import FrontendMetrics
from tidal.frontend.metrics_multiprocess import (enable_multiprocess_metrics, multiprocess_directory,
                                                 process_exited, start_process_metrics)
from tidal.protocol import EngineStats
from tidal.router.config import RouterConfig
from tidal.router.service import Router
from tidal.router.workers import Worker
from tidal.runtime.discovery import LocalDiscovery


class _NoEvents:
    """TEST DOUBLE of the event subscriber: the router here never starts."""

    def close(self) -> None:
        pass


class _StubWorkerClient:
    """TEST DOUBLE of WorkerClient: a role, health and a load report; runs nothing."""

    leaving = False
    drained = False

    def __init__(self, worker_id: str) -> None:
        self.worker_id, self.role = worker_id, "both"

    def stats(self) -> EngineStats:
        return EngineStats(num_running=2, num_waiting=1, kv_blocks_used=7, kv_blocks_total=100,
                           prefix_cache_hit_tokens=0, prompt_tokens=0, generation_tokens=0)

    def is_healthy(self) -> bool:
        return True


def _router_with_a_worker() -> Router:
    router = Router(LocalDiscovery(), RouterConfig(), events=_NoEvents())
    router.workers["w0"] = Worker(_StubWorkerClient("w0"))
    return router


def _frontend_process(directory: str, index: int) -> None:
    """One frontend process: a router replica and an app's metrics, some traffic, then exit."""
    enable_multiprocess_metrics(directory)
    router = _router_with_a_worker()
    metrics = FrontendMetrics(router, "m")
    metrics.requests["success"].inc(index + 1)
    metrics.generation_tokens.inc(10)
    metrics.ttft_s.observe(0.05)
    for itl_s in (0.004, 0.012, 0.5):
        metrics.itl_s.observe(itl_s)
    router.metrics.decisions.labels("kv").inc()
    router.metrics.queue_depth.set(3 + index)

    async def run() -> None:
        task = start_process_metrics(index, interval_s=0.01)
        end = time.process_time() + 0.05
        while time.process_time() < end:  # burn some CPU for the counter to see
            pass
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(run())


def _render_process(directory: str, out: str) -> None:
    """A third process answers a scrape for all of them."""
    enable_multiprocess_metrics(directory)
    metrics = FrontendMetrics(_router_with_a_worker(), "m")
    Path(out).write_bytes(metrics.render())


def _spawn(target, *args) -> int:
    process = multiprocessing.get_context("spawn").Process(target=target, args=args)
    process.start()
    process.join(60)
    assert process.exitcode == 0
    return process.pid


def _samples(text: str) -> dict[tuple, float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_one_scrape_merges_every_frontend_process(tmp_path):
    directory = str(tmp_path / "metrics")
    pids = [_spawn(_frontend_process, directory, index) for index in range(2)]
    # The parent noticed frontend 0 die; frontend 1 counts as alive still.
    process_exited(directory, pids[0])
    out = str(tmp_path / "scrape.txt")
    _spawn(_render_process, directory, out)
    text = Path(out).read_text()
    samples = _samples(text)

    # Counters add up, over dead processes too.
    assert samples[("tidal_requests_total", (("model_name", "m"), ("status", "success")))] == 1 + 2
    assert samples[("tidal_generation_tokens_total", (("model_name", "m"),))] == 20
    assert samples[("tidal_router_decisions_total", (("policy", "kv"),))] == 2
    # Histograms merge bucket by bucket.
    assert samples[("tidal_request_itl_seconds_count", (("model_name", "m"),))] == 6
    assert samples[("tidal_request_itl_seconds_bucket", (("le", "0.005"), ("model_name", "m")))] == 2
    assert samples[("tidal_request_itl_seconds_bucket", (("le", "0.015"), ("model_name", "m")))] == 4
    assert samples[("tidal_request_itl_seconds_bucket", (("le", "+Inf"), ("model_name", "m")))] == 6
    assert abs(samples[("tidal_request_itl_seconds_sum", (("model_name", "m"),))] - 2 * 0.516) < 1e-9
    assert samples[("tidal_request_ttft_seconds_count", (("model_name", "m"),))] == 2
    # Live gauges: the dead frontend's queue and process count are gone (the scraper's are 0).
    assert samples[("tidal_router_queue_depth", ())] == 4
    assert samples[("tidal_frontend_processes", ())] == 1
    # Each frontend's CPU, by its index.
    for index in ("0", "1"):
        assert samples[("tidal_frontend_process_cpu_seconds_total", (("frontend", index),))] >= 0.04
    # Scrape-time gauges come from the scraping process alone.
    assert samples[("tidal_worker_kv_blocks_used", (("role", "both"), ("worker_id", "w0")))] == 7
    assert samples[("tidal_running_requests", ())] == 2
    # Nothing renders twice.
    types = [line for line in text.splitlines() if line.startswith("# TYPE")]
    assert len(types) == len(set(types))
    names = [line.split()[2] for line in types]
    assert len(names) == len(set(names))


def test_single_process_mode_renders_app_then_router_registry():
    assert multiprocess_directory() is None
    assert values.ValueClass is values.MutexValue  # nothing here switched this process
    router = _router_with_a_worker()
    metrics = FrontendMetrics(router, "m")
    metrics.requests["success"].inc()
    router.metrics.queue_depth.set(2)
    text = metrics.render().decode()
    samples = _samples(text)
    assert samples[("tidal_requests_total", (("model_name", "m"), ("status", "success")))] == 1
    assert samples[("tidal_router_queue_depth", ())] == 2
    assert samples[("tidal_worker_kv_blocks_used", (("role", "both"), ("worker_id", "w0")))] == 7
    assert "tidal_frontend_process_cpu_seconds" not in text
    assert text.index("tidal_requests_total") < text.index("tidal_router_queue_depth")
