"""What the fleet simulator measures: the planner's `Observation` of each interval, the timeline of
pool sizes, the planner's decisions, and the run's `FleetResult`.

ITL: the fleet's inter-token gaps are the decode step times weighted by the tokens they produced
(the p50/p90 reported); a request's own ITL is its mean gap, (finish - first token) / (OSL - 1),
which includes its KV transfer and any wait for a decode slot. A request meets the SLO when its
TTFT and its mean ITL are within targets.

Worker-seconds count from `add` to departure, start-up and draining included.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

from tidal.planner.types import (Decision, FrontendObservation, Observation, WorkerObservation,
                                 percentile)
from tidal.sim.fleet_worker import SimRequest, SimWorker, WorkerStats


@dataclass
class FleetResult:
    requests: list[SimRequest]
    worker_seconds: float
    end_s: float
    timeline: list[dict]
    """One row per planner interval: time, pool sizes by role and state, the router's queue, requests
    waiting on decode workers."""
    gaps: list[tuple[float, float, float]]
    """(time_s, gap_ms, tokens): decode step times weighted by the tokens they produced."""
    actions: dict[str, int]
    decisions: list[dict]
    dropped: int


class FleetMetrics:
    def __init__(self, interval_s: float, kv_capacity_tokens: int, gaps: list[tuple[float, float, float]]):
        self.interval_s = interval_s
        self.kv_capacity_tokens = kv_capacity_tokens
        self.gaps = gaps  # appended to by the workers' steps
        self.timeline: list[dict] = []
        self.decisions: list[dict] = []
        self._arrivals: list[SimRequest] = []
        self._firsts: list[SimRequest] = []
        self._gap_mark = 0

    def arrived(self, request: SimRequest) -> None:
        self._arrivals.append(request)

    def first_token(self, request: SimRequest) -> None:
        self._firsts.append(request)

    def observe(self, now: float, workers: Iterable[SimWorker], queue_depth: int,
                advance: Callable[[SimWorker], None]) -> Observation:
        """The planner's view of the last interval; resets the interval's statistics. `advance`
        brings a decode worker's figures up to now."""
        observed = tuple(self._observe_worker(w, advance) for w in workers)
        arrivals, firsts = self._arrivals, self._firsts
        gaps = self.gaps[self._gap_mark:]
        self._arrivals, self._firsts, self._gap_mark = [], [], len(self.gaps)
        ttft_ms = [(r.first_token_s - r.arrival_s) * 1000 for r in firsts]
        isl = sum(r.input_len for r in arrivals)
        frontend = FrontendObservation(
            request_rate=len(arrivals) / self.interval_s,
            ttft_ms_p50=percentile(ttft_ms, 50), ttft_ms_p90=percentile(ttft_ms, 90),
            itl_ms_p50=weighted_percentile(gaps, 50), itl_ms_p90=weighted_percentile(gaps, 90),
            isl_mean=isl / len(arrivals) if arrivals else None,
            osl_mean=sum(r.output_len for r in arrivals) / len(arrivals) if arrivals else None,
            prefix_hit_rate=sum(r.cached_tokens for r in arrivals) / isl if isl else 0.0,
            queue_depth=queue_depth, num_requests=len(arrivals))
        return Observation(time_s=now, interval_s=self.interval_s, frontend=frontend, workers=observed)

    def _observe_worker(self, worker: SimWorker, advance: Callable[[SimWorker], None]) -> WorkerObservation:
        if worker.role == "decode":
            advance(worker)
        stats, worker.stats = worker.stats, WorkerStats()
        steps = stats.steps
        capacity = self.kv_capacity_tokens
        return WorkerObservation(  # a flipping worker reports the role it is becoming (the planner's contract)
            worker_id=worker.worker_id, role=worker.next_role or worker.role, state=worker.state,
            num_running=len(worker.batch) + (1 if worker.prefill_busy else 0),
            num_waiting=len(worker.queue) + len(worker.waiting), pending_prefill_tokens=worker.pending_tokens,
            kv_used_fraction=worker.kv_used / capacity, steps=round(steps), kv_capacity_tokens=capacity,
            step_s_mean=stats.busy_s / steps if steps else 0.0, prefill_tokens=stats.prefill_tokens,
            decode_tokens=round(stats.decode_tokens),
            decode_batch_mean=stats.batch_steps / steps if steps else 0.0,
            context_tokens_mean=stats.context_steps / stats.batch_steps if stats.batch_steps else 0.0)

    def record(self, observation: Observation, alive: int, router_queue: int) -> None:
        """One timeline row from an observation."""
        row = {"time_s": observation.time_s, "prefill": 0, "decode": 0, "starting": 0, "draining": 0,
               "flipping": 0, "alive": alive, "router_queue": router_queue, "decode_queue": 0}
        for w in observation.workers:
            if w.state == "active":
                row[w.role] += 1
            elif w.state in row:
                row[w.state] += 1
            if w.role == "decode":
                row["decode_queue"] += w.num_waiting
        self.timeline.append(row)

    def record_decision(self, now: float, decision: Decision) -> None:
        self.decisions.append({"time_s": now, "target_prefill": decision.target_prefill,
                               "target_decode": decision.target_decode, "loop": decision.loop,
                               "actions": [(a.kind, a.role, a.reason) for a in decision.actions],
                               "explanation": decision.explanation})


def weighted_percentile(samples: list[tuple[float, float, float]], q: float) -> float | None:
    """The q-th percentile of (time, value, weight) samples' values, weighted."""
    total = sum(s[2] for s in samples)
    if total <= 0:
        return None
    target = q / 100 * total
    acc = 0.0
    for _, value, weight in sorted(samples, key=lambda s: s[1]):
        acc += weight
        if acc >= target:
            return value
    return samples[-1][1]
