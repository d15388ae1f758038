"""The planner service: the pure planner core wired to a running deployment.

Owns the planner loop task, the observation collector's previous look, the task that carries out
actions, and the planner's metrics (on the registry it is given: the router's, so `/metrics` shows
them). Lifecycle: `start()` after the router is ready -> every `reactive_interval_s`: collect an
`Observation` from the fleet's published `FleetSnapshot` (per-worker load and the step counters of
`EngineStats` diffed over the interval; request latencies and lengths from the finished-request log),
call `Planner.step`, export the targets, log the decision, hand its actions to the executor ->
`close()` before the router closes.

Invariants: the request path never waits on the planner (the loop only reads snapshots; actions run
in their own task, one at a time); while an action batch runs, new actions are skipped (the next
step decides again with what the fleet has become); an action that fails is logged and counted in
`tidal_planner_action_failures_total`, and the loop goes on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tidal.fleet_snapshot import FinishedRequest, FleetSnapshot, WorkerSnapshot
from tidal.planner.actuators import Actuator
from tidal.planner.types import (Action, Decision, FrontendObservation, Observation, PlannerConfig,
                                 WorkerObservation, percentile)
from tidal.protocol import EngineStats

logger = logging.getLogger(__name__)

FLIP_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_ZERO_STATS = EngineStats(num_running=0, num_waiting=0, kv_blocks_used=0, kv_blocks_total=0,
                          prefix_cache_hit_tokens=0, prompt_tokens=0, generation_tokens=0)


class ObservationCollector:
    """Turns the fleet's published snapshots into `Observation`s; keeps the last counters per worker to diff."""

    def __init__(self, snapshot: Callable[[], FleetSnapshot], clock: Callable[[], float] = time.monotonic):
        """`snapshot`: the fleet as its router publishes it now (`Router.snapshot`)."""
        self.snapshot = snapshot
        self.clock = clock
        self.last_time = clock()
        self.last_arrivals = snapshot().arrivals_total
        self.last_stats: dict[str, EngineStats] = {}
        self.states: dict[str, str] = {}  # worker_id -> state the executor set ("flipping", "stopping")

    def collect(self) -> Observation:
        now = self.clock()
        fleet = self.snapshot()
        interval_s = max(now - self.last_time, 1e-9)
        finished = fleet.finished_since(self.last_time)
        arrivals = fleet.arrivals_total - self.last_arrivals
        self.last_time, self.last_arrivals = now, fleet.arrivals_total
        frontend = self._frontend(finished, arrivals, interval_s, fleet.queue_depth)
        workers = tuple(self._worker(w) for w in fleet.workers)
        return Observation(time_s=now, interval_s=interval_s, frontend=frontend, workers=workers)

    @staticmethod
    def _frontend(finished: list[FinishedRequest], arrivals: int, interval_s: float,
                  queue_depth: int) -> FrontendObservation:
        ttft_ms = [f.ttft_s * 1e3 for f in finished]
        itl_ms = [f.itl_s * 1e3 for f in finished if f.itl_s is not None]
        prompt = sum(f.prompt_tokens for f in finished)
        return FrontendObservation(
            request_rate=arrivals / interval_s, ttft_ms_p50=percentile(ttft_ms, 50),
            ttft_ms_p90=percentile(ttft_ms, 90), itl_ms_p50=percentile(itl_ms, 50),
            itl_ms_p90=percentile(itl_ms, 90),
            isl_mean=prompt / len(finished) if finished else None,
            osl_mean=sum(f.output_tokens for f in finished) / len(finished) if finished else None,
            prefix_hit_rate=sum(f.cached_tokens for f in finished) / prompt if prompt else 0.0,
            queue_depth=queue_depth, num_requests=arrivals)

    def _worker(self, worker: WorkerSnapshot) -> WorkerObservation:
        if not worker.connected:  # registered, not yet connected
            return WorkerObservation(worker_id=worker.worker_id, role=worker.role, state="starting", reported=False)
        worker_id, stats = worker.worker_id, worker.stats
        state = self.states.get(worker_id) or ("draining" if worker.draining else "active")
        if stats is None:
            return WorkerObservation(worker_id=worker_id, role=worker.role, state=state, reported=False)
        last = self.last_stats.get(worker_id, stats)  # first look: nothing to diff yet
        if stats.steps_total < last.steps_total:  # a restarted worker counts from zero
            last = _ZERO_STATS
        self.last_stats[worker_id] = stats
        steps = stats.steps_total - last.steps_total
        seqs = stats.decode_seqs_total - last.decode_seqs_total
        return WorkerObservation(
            worker_id=worker_id, role=worker.role, state=state, num_running=stats.num_running,
            num_waiting=stats.num_waiting, pending_prefill_tokens=worker.pending_prefill_tokens,
            kv_used_fraction=stats.kv_blocks_used / stats.kv_blocks_total if stats.kv_blocks_total else 0.0,
            steps=steps, step_s_mean=(stats.step_seconds_total - last.step_seconds_total) / steps if steps else 0.0,
            prefill_tokens=stats.prefill_tokens_total - last.prefill_tokens_total,
            decode_tokens=stats.generation_tokens - last.generation_tokens,
            decode_batch_mean=seqs / steps if steps else 0.0,
            context_tokens_mean=(stats.context_tokens_total - last.context_tokens_total) / seqs if seqs else 0.0,
            kv_capacity_tokens=stats.kv_blocks_total * worker.block_size)


class PlannerService:
    def __init__(self, config: PlannerConfig, snapshot: Callable[[], FleetSnapshot] | None, actuator: Actuator,
                 registry: CollectorRegistry, planner=None):
        """`snapshot`: the fleet as its router publishes it (`Router.snapshot`); None (the planner in its
        own process, `tidal planner`): no loop of its own, the caller hands each observation to
        `step_once`. `registry`: where the planner's metrics go. `planner`: anything with
        `step(Observation) -> Decision`; default `Planner(config)`."""
        if planner is None:
            from tidal.planner.core import Planner
            planner = Planner(config)
        self.config = config
        self.snapshot = snapshot
        self.actuator = actuator
        self.planner = planner
        self.collector = ObservationCollector(snapshot) if snapshot is not None else None
        self.last_decision: Decision | None = None
        self.flips = []  # FlipResults, newest last (bounded)
        self._loop: asyncio.Task | None = None
        self._executor: asyncio.Task | None = None
        self._init_metrics(registry)

    def _init_metrics(self, r: CollectorRegistry) -> None:
        # One planner sets it; across processes its latest value holds while that process lives.
        self.target_workers = Gauge("tidal_planner_target_workers", "Workers the planner wants, by role.",
                                    ["role"], registry=r, multiprocess_mode="livemostrecent")
        self.decisions = Counter("tidal_planner_decisions", "Planner actions decided, by kind and reason.",
                                 ["action", "reason"], registry=r)
        self.failures = Counter("tidal_planner_action_failures", "Planner actions that failed (logged).",
                                ["action"], registry=r)
        self.skipped = Counter("tidal_planner_actions_skipped", "Actions not carried out because the previous "
                               "ones were still running.", registry=r)
        self.flip_unavailable_s = Histogram("tidal_planner_flip_unavailable_seconds", "Per role flip: from the "
                                            "end of the worker's drain until it takes requests in its new role.",
                                            buckets=FLIP_BUCKETS_S, registry=r)
        self.flip_drain_s = Histogram("tidal_planner_flip_drain_seconds", "Per role flip: the drain before it.",
                                      buckets=FLIP_BUCKETS_S, registry=r)

    async def start(self) -> None:
        logger.info("planner: %s", self.config)
        if self.snapshot is not None:
            self.collector = ObservationCollector(self.snapshot)
            self._loop = asyncio.create_task(self._run())

    async def close(self) -> None:
        for task in (self._loop, self._executor):
            if task is not None and not task.done():
                task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, Exception):  # noqa: BLE001 - closing anyway
                    pass

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.config.reactive_interval_s)
            try:
                self.step_once()
            except Exception:  # noqa: BLE001 - a planner bug must not take the server down
                logger.exception("planner step failed")

    def step_once(self, obs: Observation | None = None) -> Decision:
        """One observation (default: collected from the fleet's snapshot now) -> decision -> actions handed to
        the executor."""
        decision = self.planner.step(obs if obs is not None else self.collector.collect())
        self.last_decision = decision
        self.target_workers.labels("prefill").set(decision.target_prefill)
        self.target_workers.labels("decode").set(decision.target_decode)
        for action in decision.actions:
            self.decisions.labels(action.kind, action.reason or "none").inc()
        if decision.actions:
            logger.info("planner %s decision: prefill %d, decode %d; %s: %s", decision.loop, decision.target_prefill,
                        decision.target_decode, ", ".join(_describe(a) for a in decision.actions),
                        decision.explanation)
            if self._executor is not None and not self._executor.done():
                self.skipped.inc(len(decision.actions))
                logger.info("planner: previous actions still running; skipping these")
            else:
                self._executor = asyncio.create_task(self._execute(decision.actions))
        else:
            logger.debug("planner %s decision: prefill %d, decode %d: %s", decision.loop, decision.target_prefill,
                         decision.target_decode, decision.explanation)
        return decision

    async def _execute(self, actions: tuple[Action, ...]) -> None:
        for action in actions:
            try:
                await self._apply(action)
            except Exception as exc:  # noqa: BLE001 - logged and counted; the next step decides again
                self.failures.labels(action.kind).inc()
                logger.error("planner: %s failed: %s", _describe(action), exc)
            finally:
                self._mark(action.worker_id, None)

    async def _apply(self, action: Action) -> None:
        if action.kind == "add":
            await self.actuator.add_worker(action.role)
        elif action.kind == "remove":
            self._mark(action.worker_id, "stopping")
            await self.actuator.remove_worker(action.worker_id)
        elif action.kind == "flip":
            self._mark(action.worker_id, "flipping")
            result = await self.actuator.flip_worker(action.worker_id, action.role)
            self.flip_unavailable_s.observe(result.unavailable_s)
            self.flip_drain_s.observe(result.drain_s)
            self.flips = [*self.flips[-99:], result]
        else:
            raise ValueError(f"unknown action {action.kind!r}")

    def _mark(self, worker_id: str | None, state: str | None) -> None:
        """What the next observations say of a worker being acted on (None: what it is)."""
        if worker_id is None or self.collector is None:
            return
        if state is None:
            self.collector.states.pop(worker_id, None)
        else:
            self.collector.states[worker_id] = state


def _describe(action: Action) -> str:
    target = f" {action.worker_id}" if action.worker_id else ""
    return f"{action.kind}{target} -> {action.role} ({action.reason or 'no reason given'})"
