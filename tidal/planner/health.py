"""A pool's health: its signals (latency, queue, KV use) as ratios to their targets.

Pure functions of one observation, the pools counted from it, the performance model and the
lengths seen now: `prefill_health` (TTFT P90 against the SLO; the prefill queue's drain time against
its share of it) and `decode_health` (ITL P90 and step time against the ITL target; KV use; requests
waiting for a decode slot). Each says whether the pool is in trouble (and why: a metric label),
its worst ratio, and the workers its backlog would take.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tidal.planner.perf_model import PerfModel
from tidal.planner.pools import Pool
from tidal.planner.types import Observation, PlannerConfig, Thresholds
from tidal.protocol import Role


@dataclass(frozen=True)
class Health:
    """A pool's signals as ratios to their targets (> 1: over the target)."""

    trouble: str | None  # the reason label when in trouble
    worst_ratio: float
    backlog_workers: float = 0.0  # workers it would take to drain its queue within backlog_clear_s


def prefill_health(obs: Observation, pools: dict[Role, Pool], perf: PerfModel, config: PlannerConfig,
                   thresholds: Thresholds) -> Health:
    """TTFT P90 against the SLO, and the prefill queue's drain time against its share of it."""
    ttft_ms = config.slo.ttft_ms
    front = obs.frontend
    ttft_ratio = (front.ttft_ms_p90 or 0.0) / ttft_ms
    # Prompts wait on the prefill workers, or on every worker when there are none (local prefill).
    serving = pools["prefill"].active or [w for w in obs.workers if w.state == "active"]
    queued_tokens = sum(w.pending_prefill_tokens for w in serving)
    queued_tokens += front.queue_depth * (front.isl_mean or 0.0) * (1 - front.prefix_hit_rate)
    throughput = len(serving) * perf.prefill_tokens_per_s(ttft_ms)
    wait_s = queued_tokens / throughput if throughput > 0 else (math.inf if queued_tokens > 0 else 0.0)
    queue_ratio = wait_s / (thresholds.queue_wait_fraction * ttft_ms / 1000)
    trouble = "ttft_over_slo" if ttft_ratio > 1 else "prefill_queue" if queue_ratio > 1 else None
    backlog = queued_tokens / (perf.prefill_tokens_per_s(ttft_ms) * config.backlog_clear_s)
    return Health(trouble, max(ttft_ratio, queue_ratio), backlog)


def decode_health(obs: Observation, pools: dict[Role, Pool], perf: PerfModel, config: PlannerConfig,
                  thresholds: Thresholds, lengths: tuple[float, float, float]) -> Health:
    """ITL P90 and the decode workers' step time against the ITL target; their KV use; requests
    waiting for a decode slot (their backlog is those requests over a worker's batch)."""
    itl_ms = config.slo.itl_ms
    itl_ratio = (obs.frontend.itl_ms_p90 or 0.0) / itl_ms
    decoding = pools["decode"].active or [w for w in obs.workers if w.state == "active" and w.role == "both"]
    steps = sum(w.steps for w in decoding)
    step_ms = 1000 * sum(w.steps * w.step_s_mean for w in decoding) / steps if steps else 0.0
    step_ratio = step_ms / itl_ms
    kv_ratio = (sum(w.kv_used_fraction for w in decoding) / len(decoding) / thresholds.kv_pressure
                if decoding else 0.0)
    isl, osl, _ = lengths
    batch = perf.decode_batch(itl_ms, isl + osl / 2, isl + osl)
    waiting = sum(w.num_waiting for w in pools["decode"].active)
    backlog = waiting / batch
    queue_ratio = backlog / thresholds.decode_queue_workers
    if itl_ratio > 1 or step_ratio > 1:
        trouble = "itl_over_slo"
    elif kv_ratio > 1:
        trouble = "kv_pressure"
    else:
        trouble = "decode_queue" if queue_ratio > 1 else None
    return Health(trouble, max(itl_ratio, step_ratio, kv_ratio, queue_ratio), backlog)
