"""Prometheus multiprocess mode: one coherent `/metrics` across the frontend processes.

Several frontend processes share one HTTP port, so a scrape reaches whichever one the kernel picks;
each must answer for all of them. This module owns the switch of THIS process to file-backed metric
values (process-global, like the `prometheus_client.values.ValueClass` it swaps), the directory the
files live in, and the per-frontend-process metrics (CPU seconds, live count).

Lifecycle:
1. the parent calls `enable_multiprocess_metrics(dir, clear=True)` before it builds its control
   router and planner; each spawned frontend process calls `enable_multiprocess_metrics(dir)` first
   thing, before it builds its router replica and app;
2. every metric created afterwards writes its value to `<dir>/<type>_<pid>.db` on each update;
3. a scrape in any process renders `merged_registry(...)`: counters and histograms summed over all
   files (dead processes' totals included, so sums never go backwards), gauges combined as their
   `multiprocess_mode` says, plus that process's own scrape-time collectors (worker load reports,
   which every replica sees alike);
4. when a child dies the parent calls `process_exited(dir, pid)`, which drops its `live*` gauges.

Invariants: metrics created before `enable_multiprocess_metrics` stay in-process and are not
rendered in multiprocess mode (nothing in tidal creates metrics at import time); every Gauge names
its `multiprocess_mode`; scrape-time collectors are never file-backed, so nothing renders twice.
"""

from __future__ import annotations

import asyncio
import glob
import os
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, values
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

# prometheus_client reads the directory from here when it opens a process's files.
_DIRECTORY_ENV = "PROMETHEUS_MULTIPROC_DIR"
_directory: str | None = None

PROCESS_METRICS_INTERVAL_S = 1.0


def enable_multiprocess_metrics(directory: str, *, clear: bool = False) -> None:
    """Makes every metric this process creates from now on file-backed in `directory`.

    `clear`: delete the files of an earlier run first (the parent, once, before any child starts).
    Processes spawned afterwards inherit the directory through the environment.
    """
    global _directory
    os.makedirs(directory, exist_ok=True)
    if clear:
        for path in glob.glob(os.path.join(directory, "*.db")):
            os.remove(path)
    os.environ[_DIRECTORY_ENV] = directory
    # metrics.py looks `values.ValueClass` up at each metric's construction, so swapping it here
    # switches every metric created afterwards; a fresh class also drops any file handles a
    # previous enable held.
    values.ValueClass = values.MultiProcessValue()
    _directory = directory


def multiprocess_directory() -> str | None:
    """The directory of this process's file-backed metrics; None in single-process mode."""
    return _directory


def process_exited(directory: str, pid: int) -> None:
    """Bookkeeping for a child that died: its live gauges (queue depth, process count) stop
    counting; its counters and histograms stay in the totals."""
    mark_process_dead(pid, directory)


def merged_registry(*live_collectors: Collector) -> CollectorRegistry:
    """A fresh registry: the file-backed metrics of every process, merged, plus `live_collectors`
    (this process's scrape-time collectors, which must not be file-backed)."""
    if _directory is None:
        raise RuntimeError("multiprocess metrics are not enabled in this process")
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=_directory)
    for collector in live_collectors:
        registry.register(collector)
    return registry


def start_process_metrics(frontend_index: int,
                          interval_s: float = PROCESS_METRICS_INTERVAL_S) -> asyncio.Task:
    """Counts this frontend process as live and advances its CPU-seconds counter every
    `interval_s` on the running loop (the task's cancellation takes a last reading).

    Multiprocess mode only: the metrics are on no registry; the merged files render them."""
    if _directory is None:
        raise RuntimeError("start_process_metrics needs enable_multiprocess_metrics first")
    cpu_s = Counter("tidal_frontend_process_cpu_seconds", "CPU time of each frontend process (all "
                    "its threads), by frontend index.", ["frontend"], registry=None)
    live = Gauge("tidal_frontend_processes", "Frontend processes alive.", registry=None,
                 multiprocess_mode="livesum")
    live.set(1)
    return asyncio.get_running_loop().create_task(_advance_cpu(cpu_s.labels(str(frontend_index)),
                                                               interval_s))


async def _advance_cpu(cpu_s: Counter, interval_s: float) -> None:
    counted = 0.0  # CPU since the process started: its start-up (imports, tokenizer) included
    try:
        while True:
            now = time.process_time()
            cpu_s.inc(now - counted)
            counted = now
            await asyncio.sleep(interval_s)
    finally:
        cpu_s.inc(time.process_time() - counted)
