"""A pool's health: its signals (latency, queue, KV use) as ratios to their targets.

Pure functions of one observation, the pools counted from it, the performance model and the
lengths seen now: `prefill_health` (TTFT P90 against the SLO; the prefill queue's drain time against
its share of it) and `decode_health` (ITL P90 and step time against the ITL target; KV use; requests
waiting for a decode slot). Each says whether the pool is in trouble (and why: a metric label),
every signal's ratio, whether it is measured idle, and the workers its backlog would take.

A signal is measured only from what the observation has: a latency only when requests finished
(its P90 is not None), a step time only from workers that ran steps, KV use and queues only from
workers that sent a load report (`WorkerObservation.reported`). A signal without data has no ratio
(None): it is neither in trouble nor slack, and its absence counts as zero nowhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tidal.planner.perf_model import PerfModel
from tidal.planner.pools import Pool
from tidal.planner.types import Observation, PlannerConfig, Thresholds, WorkerObservation
from tidal.protocol import Role


@dataclass(frozen=True)
class Health:
    """A pool's signals as ratios to their targets (> 1: over the target; None: not measured)."""

    trouble: str | None  # the reason label when in trouble
    ratios: dict[str, float | None] = field(default_factory=dict)
    backlog_workers: float = 0.0  # workers it would take to drain its queue within backlog_clear_s
    idle: bool = False
    """Measured idle: every worker of the pool reported nothing running, waiting or pending, and no
    request arrived or waits in the router (zero arrivals counted is data; no report is not)."""

    @property
    def worst_ratio(self) -> float | None:
        """The largest measured ratio; None when no signal is measured."""
        measured = [r for r in self.ratios.values() if r is not None]
        return max(measured) if measured else None

    @property
    def latency_measured(self) -> bool:
        """Whether the pool's latency target is measured: TTFT for prefill, ITL or step time for decode."""
        return any(self.ratios.get(name) is not None for name in ("ttft", "itl", "step"))

    def has_slack(self, slack_fraction: float) -> bool:
        """Whether the pool may give capacity away: not in trouble, and either measured idle or its
        latency measured with every measured signal under `slack_fraction` of its target."""
        if self.trouble is not None:
            return False
        worst = self.worst_ratio
        return self.idle or (self.latency_measured and worst is not None and worst < slack_fraction)

    def describe(self) -> str:
        """`name ratio` for each signal ('-' when not measured), for the planner's log line."""
        return ", ".join(f"{name} {'-' if r is None else f'{r:.2f}'}" for name, r in self.ratios.items())


def prefill_health(obs: Observation, pools: dict[Role, Pool], perf: PerfModel, config: PlannerConfig,
                   thresholds: Thresholds) -> Health:
    """TTFT P90 against the SLO, and the prefill queue's drain time against its share of it."""
    ttft_ms = config.slo.ttft_ms
    front = obs.frontend
    ttft_ratio = None if front.ttft_ms_p90 is None else front.ttft_ms_p90 / ttft_ms
    # Prompts wait on the prefill workers, or on every worker when there are none (local prefill).
    serving = pools["prefill"].active or [w for w in obs.workers if w.state == "active"]
    queued_tokens = sum(w.pending_prefill_tokens for w in serving)
    queued_tokens += front.queue_depth * (front.isl_mean or 0.0) * (1 - front.prefix_hit_rate)
    throughput = len(serving) * perf.prefill_tokens_per_s(ttft_ms)
    queue_ratio = None
    if queued_tokens > 0 or any(w.reported for w in serving):
        wait_s = queued_tokens / throughput if throughput > 0 else (math.inf if queued_tokens > 0 else 0.0)
        queue_ratio = wait_s / (thresholds.queue_wait_fraction * ttft_ms / 1000)
    trouble = ("ttft_over_slo" if _over(ttft_ratio) else "prefill_queue" if _over(queue_ratio) else None)
    backlog = queued_tokens / (perf.prefill_tokens_per_s(ttft_ms) * config.backlog_clear_s)
    idle = _measured_idle(pools["prefill"].active, obs)
    return Health(trouble, {"ttft": ttft_ratio, "queue": queue_ratio}, backlog, idle)


def decode_health(obs: Observation, pools: dict[Role, Pool], perf: PerfModel, config: PlannerConfig,
                  thresholds: Thresholds, lengths: tuple[float, float, float]) -> Health:
    """ITL P90 and the decode workers' step time against the ITL target; their KV use; requests
    waiting for a decode slot (their backlog is those requests over a worker's batch)."""
    itl_ms = config.slo.itl_ms
    itl_ratio = None if obs.frontend.itl_ms_p90 is None else obs.frontend.itl_ms_p90 / itl_ms
    decoding = pools["decode"].active or [w for w in obs.workers if w.state == "active" and w.role == "both"]
    reporting = [w for w in decoding if w.reported]
    steps = sum(w.steps for w in reporting)
    step_ratio = (1000 * sum(w.steps * w.step_s_mean for w in reporting) / steps / itl_ms) if steps else None
    kv_ratio = (sum(w.kv_used_fraction for w in reporting) / len(reporting) / thresholds.kv_pressure
                if reporting else None)
    isl, osl, _ = lengths
    batch = perf.decode_batch(itl_ms, isl + osl / 2, isl + osl)
    waiting_on = [w for w in pools["decode"].active if w.reported]
    backlog = sum(w.num_waiting for w in waiting_on) / batch
    queue_ratio = backlog / thresholds.decode_queue_workers if waiting_on else None
    if _over(itl_ratio):
        trouble = "itl_over_slo"
    elif _over(step_ratio):
        trouble = "step_over_itl"  # the steps are slower than the ITL target, whatever ITL says yet
    elif _over(kv_ratio):
        trouble = "kv_pressure"
    else:
        trouble = "decode_queue" if _over(queue_ratio) else None
    ratios = {"itl": itl_ratio, "step": step_ratio, "kv": kv_ratio, "queue": queue_ratio}
    return Health(trouble, ratios, backlog, _measured_idle(pools["decode"].active, obs))


def _over(ratio: float | None) -> bool:
    return ratio is not None and ratio > 1


def _measured_idle(workers: list[WorkerObservation], obs: Observation) -> bool:
    """Every one of `workers` (at least one) reported nothing running, waiting or pending, and the
    frontend counted no arrival and holds no request."""
    front = obs.frontend
    quiet_front = front.request_rate == 0 and front.num_requests == 0 and front.queue_depth == 0
    return bool(workers) and quiet_front and all(
        w.reported and w.num_running == 0 and w.num_waiting == 0 and w.pending_prefill_tokens == 0
        for w in workers)
