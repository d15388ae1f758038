"""A run of the load generator from the command line: one rate (`run_bench`, from one client
process or several) or a sweep of rates with the capacity it finds (`sweep`)."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

from tidal.bench.clients import run_clients
from tidal.bench.metrics import format_summary
from tidal.bench.runner import Bench, BenchConfig


def run_bench(config: BenchConfig, processes: int = 1) -> dict:
    """One run (from `processes` client processes), its summary printed."""
    if processes > 1:
        summary = run_clients(config, processes)
    else:
        summary = asyncio.run(Bench(config).run())
    print(format_summary(summary))
    return summary


def sweep(config: BenchConfig, rates: list[float], min_attainment_pct: float = 90.0,
          processes: int = 1) -> tuple[list[dict], float | None]:
    """Runs the workload at each rate (into OUTPUT/rate-R); the capacity is the highest rate whose
    SLO attainment is at least `min_attainment_pct`."""
    summaries = []
    for rate in rates:
        output = str(Path(config.output) / f"rate-{rate:g}") if config.output else None
        summaries.append(run_bench(dataclasses.replace(config, rate=rate, output=output), processes))
    good = [rate for rate, s in zip(rates, summaries) if (s["slo_attainment_pct"] or 0) >= min_attainment_pct]
    capacity = max(good) if good else None
    print("| rate | achieved req/s | goodput | SLO attainment % | TTFT p99 ms | ITL p99 ms |")
    print("|---|---|---|---|---|---|")
    for rate, s in zip(rates, summaries):
        print(f"| {rate:g} | {s['achieved_rate']:.2f} | {s['goodput_rps']:.2f} | "
              f"{s['slo_attainment_pct']:.1f} | "
              f"{s['ttft_ms']['p99'] or 0:.1f} | {s['itl_ms']['p99'] or 0:.1f} |")
    print(f"capacity (>= {min_attainment_pct:g}% SLO attainment): "
          + (f"{capacity:g} arrivals/s" if capacity is not None else "none of the rates"))
    return summaries, capacity
