"""One benchmark run from several client processes: `tidal bench --processes K`.

A single asyncio process parses every SSE chunk of every stream in Python; past roughly one core
(tens of thousands of streamed tokens/s) it falls behind the server it measures, and the ITL it
reports is its own. `run_clients` splits the run into K shares, one per spawned process, and
merges what they measured into one summary as if one client had sent everything:

- chat and synthetic only (a trace is one fixed schedule, not a rate to divide);
- each share gets rate / K arrivals per second (K Poisson streams add up to one of the full rate),
  its share of `requests`/`sessions` and of `max_concurrency`, and its own random stream; request
  and session numbers stay unique over the run (`BenchConfig.client_index`, `num_clients`);
- every share starts its clock at one `start_at` (time.perf_counter is one clock for the whole
  machine), a little after the spawn, so send times and schedule lags compare across shares;
- the summary's `client_cpu_cores` adds the shares' CPU up; `client_cpu_cores_max` is the busiest.
"""

from __future__ import annotations

import asyncio
import dataclasses
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor

from tidal.bench.metrics import RequestRecord, summarize
from tidal.bench.runner import Bench, BenchConfig, client_cpu, write_run

SPAWN_ALLOWANCE_S = 2.0  # a client process's start (imports, the model lookup) before the shared clock


def share(config: BenchConfig, index: int, processes: int) -> BenchConfig:
    """Client `index`'s part of a run split over `processes` processes."""
    def part(total: int | None) -> int | None:
        if total is None:
            return None
        return total // processes + (index < total % processes)

    limit = config.max_concurrency
    return dataclasses.replace(config, rate=config.rate / processes, requests=part(config.requests),
                               sessions=part(config.sessions), output=None, progress=False, client_index=index,
                               num_clients=processes,
                               max_concurrency=None if limit is None else max(1, part(limit)))


def _run_share(config: BenchConfig) -> dict:
    """In a client process: the share's records (as dicts), its run time and its CPU."""
    bench = Bench(config)
    asyncio.run(bench.run())
    return {"records": [dataclasses.asdict(r) for r in bench.records], "duration_s": bench.duration_s,
            "cpu_s": bench.cpu_s, "model": bench.model}


def start_time(processes: int) -> float:
    """A perf_counter time late enough for `processes` spawned clients to be ready by then."""
    return time.perf_counter() + SPAWN_ALLOWANCE_S + 0.25 * processes


def run_shares(config: BenchConfig, processes: int) -> tuple[list[RequestRecord], dict]:
    """Run `config` from `processes` spawned processes (its `start_at`, or `start_time()`): every
    record, on the one clock, and the merged summary."""
    if config.workload == "trace":
        raise ValueError("--processes splits chat and synthetic runs; a trace replays from one process")
    if config.start_at is None:
        config = dataclasses.replace(config, start_at=start_time(processes))
    shares = [share(config, i, processes) for i in range(processes)]
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(_run_share, shares))
    records = sorted((RequestRecord(**fields) for r in results for fields in r["records"]), key=lambda r: r.sent_s)
    duration_s = max(r["duration_s"] for r in results)
    summary = summarize(records, duration_s, dict(config.slo), offered_rate=config.rate)
    summary.update(client_cpu([r["cpu_s"] for r in results], duration_s))
    summary["model"] = results[0]["model"]
    return records, summary


def run_clients(config: BenchConfig, processes: int) -> dict:
    """`run_shares`, written like one run's output."""
    records, summary = run_shares(config, processes)
    write_run(config, summary.pop("model"), records, summary)
    return summary
