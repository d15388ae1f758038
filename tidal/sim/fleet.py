"""A discrete-event simulator of a disaggregated fleet (prefill + decode workers) at the scale of
hundreds of workers, with a planner in the loop: `tidal sim-fleet`.

`tidal sim` runs real engine cores on threads and keeps wall-clock time; this simulator keeps only a
simulated clock and a heap of events (`fleet_events`: no threads, no sleeping), so 256 workers and
ten simulated minutes run in seconds. Step times come from a `StepTimeModel` (a measured `Profile`
or a `TimingModel`).

The parts: `Fleet` (this module) owns the workers' lifecycle, the event loop and the planner hook;
`fleet_routing.SimRouter` routes with the live router's policy functions; `fleet_steps.WorkerSteps`
spends a worker's time (prefill steps, the fluid decode batch, and their approximations);
`fleet_metrics.FleetMetrics` makes the planner's observations and the run's result;
`fleet_worker` holds a request's and a worker's state.

Lifecycle of one request: arrival -> the router (routed at once, or held in its admission queue
until a worker has room) -> remote prefill on a prefill worker, first token, KV transfer to its
decode worker; or local prefill on its decode worker -> decode in a continuous batch -> finish.
Lifecycle of one worker: `starting` (for `startup_s`) -> `active` -> `draining` (remove: no new work,
leaves once empty and no routed request uses it) or `flipping` (drains likewise, waits `flip_s`,
comes back `active` in its new role without a restart).

Invariants: a request is never dropped (a worker leaves only when empty; requests with no active
decode worker wait in the router's queue); worker-seconds count from `add` to departure, start-up
and draining included.
"""

from __future__ import annotations

import itertools
from typing import Protocol

from tidal.planner.types import Action, Decision, Observation
from tidal.protocol import Role
from tidal.sim.fleet_config import FleetConfig
from tidal.sim.fleet_events import EventQueue
from tidal.sim.fleet_metrics import FleetMetrics, FleetResult
from tidal.sim.fleet_routing import Route, SimRouter
from tidal.sim.fleet_steps import WorkerSteps
from tidal.sim.fleet_worker import SimRequest, SimWorker
from tidal.sim.timing import CachedSteps, StepTimeModel


class PlannerLike(Protocol):
    def step(self, obs: Observation) -> Decision: ...


class Fleet:
    """The simulator. `run(arrivals, planner)` plays one workload to the end (see the module docstring)."""

    def __init__(self, config: FleetConfig, model: StepTimeModel, prefill: int, decode: int,
                 interval_s: float = 2.0):
        self.config = config
        self.interval_s = interval_s
        self.events = EventQueue()
        steps_model = CachedSteps(model, config.context_quantum) if config.context_quantum > 1 else model
        self.steps = WorkerSteps(config, steps_model, self.events, self)
        self.router = SimRouter(config, self._active, self._dispatch)
        self.metrics = FleetMetrics(interval_s, config.kv_capacity_tokens, self.steps.gaps)
        self._ids = itertools.count()
        self._active_cache: dict[str, list[SimWorker]] = {}
        self.workers: dict[str, SimWorker] = {}
        self.gone: list[SimWorker] = []
        self.requests: list[SimRequest] = []
        self.actions = {"add": 0, "remove": 0, "flip": 0, "refused": 0}
        for role, count in (("prefill", prefill), ("decode", decode)):
            for _ in range(count):
                self._new_worker(role, state="active")

    @property
    def now(self) -> float:
        return self.events.now

    # ---- the event loop -------------------------------------------------------------------------
    def run(self, arrivals: list[SimRequest], planner: PlannerLike | None = None) -> FleetResult:
        self.requests = arrivals
        for r in arrivals:
            self.events.at(r.arrival_s, "arrive", r)
        last_arrival = arrivals[-1].arrival_s if arrivals else 0.0
        self.events.at(self.interval_s, "observe", planner)
        handlers = {"arrive": self._on_arrive, "prefill_done": self._on_prefill_done, "kv_ready": self._on_kv_ready,
                    "local_first_token": self._on_local_first_token, "started": self._on_started,
                    "flipped": self._on_flipped}
        deadline = last_arrival + self.config.run_on_s
        while self.events and self.events.peek_time() <= deadline:
            time_s, kind, payload, version = self.events.pop()
            if kind == "decode":
                self._on_decode(payload, version)
            elif kind == "observe":
                if time_s > last_arrival and self._all_done():
                    break
                self._on_observe(payload)
            else:
                handlers[kind](payload)
            if self.router.wake_needed:
                self.router.wake()
        return self._result()

    def _all_done(self) -> bool:
        return all(r.finish_s is not None for r in self.requests)

    def _on_arrive(self, request: SimRequest) -> None:
        self.metrics.arrived(request)
        self.router.admit(request)

    def _dispatch(self, request: SimRequest, route: Route) -> None:
        """A routed request goes to its prefill worker's queue, or to its decode worker to prefill there."""
        request.worker_id = route.decode.worker_id
        if route.prefill is None:
            request.local_prefill = True
            self.steps.send_decode(route.decode, request)
            self.router.report(route.decode)
        else:
            self.steps.send_prefill(route.prefill, request)
            self.router.report(route.prefill)

    def _on_prefill_done(self, payload) -> None:
        worker, batch, tokens = payload
        self.steps.finish_prefill_step(worker, batch, tokens)
        self.router.report(worker)
        self.router.wake()  # before the worker's next step, so prompts held for room can join it
        if worker.queue and not worker.prefill_busy:
            self.steps.start_prefill_step(worker)
            self.router.report(worker)
        else:
            self._maybe_leave(worker)

    def _on_kv_ready(self, request: SimRequest) -> None:
        prefill = self.router.kv_arrived(request)
        decode = self.workers[request.worker_id]
        self.steps.send_decode(decode, request)
        self.router.report(decode)
        if prefill is not None:
            self._maybe_leave(prefill)

    def _on_local_first_token(self, payload) -> None:
        worker, request = payload
        self.steps.local_first_token(worker, request)
        self.router.report(worker)

    def _on_decode(self, worker: SimWorker, version: int) -> None:
        self.steps.on_decode(worker, version)
        self.router.report(worker)
        if not worker.batch:
            self._maybe_leave(worker)

    # ---- what the workers' steps report (StepListener) ------------------------------------------
    def first_token(self, request: SimRequest) -> None:
        self.metrics.first_token(request)
        self.router.first_token(request)

    def finished(self, request: SimRequest) -> None:
        route = self.router.release(request)
        self._maybe_leave(route.decode)
        if route.prefill is not None:
            self._maybe_leave(route.prefill)  # a one-token request: its prefill worker is free now

    # ---- workers --------------------------------------------------------------------------------
    def _new_worker(self, role: Role, state: str = "starting") -> SimWorker:
        worker = SimWorker(f"w{next(self._ids)}", role, self.now, state)
        self.workers[worker.worker_id] = worker
        self._active_cache.clear()
        if state == "starting":
            self.events.after(self.config.startup_s, "started", worker)
        return worker

    def _on_started(self, worker: SimWorker) -> None:
        if worker.state == "starting":
            self._set_state(worker, "active")
            self.router.wake()

    def _on_flipped(self, worker: SimWorker) -> None:
        worker.role, worker.next_role, worker.switching = worker.next_role, None, False
        self._set_state(worker, "active")
        worker.t_last = self.now
        self.router.wake()

    def _maybe_leave(self, worker: SimWorker) -> None:
        """A draining or flipping worker that has emptied, and that no routed request uses, leaves or
        starts its role switch."""
        if not worker.is_empty or self.router.in_use(worker):
            return
        if worker.state == "draining":
            self._set_state(worker, "stopping")
            worker.left_s = self.now
            self.gone.append(self.workers.pop(worker.worker_id))
        elif worker.state == "flipping" and not worker.switching:
            worker.switching = True
            self.events.after(self.config.flip_s, "flipped", worker)

    def _active(self, role: str) -> list[SimWorker]:
        active = self._active_cache.get(role)
        if active is None:
            active = [w for w in self.workers.values() if w.role == role and w.state == "active"]
            self._active_cache[role] = active
        return active

    def _set_state(self, worker: SimWorker, state: str) -> None:
        worker.state = state
        self._active_cache.clear()

    # ---- the planner ----------------------------------------------------------------------------
    def _on_observe(self, planner: PlannerLike | None) -> None:
        observation = self.observe()
        self.metrics.record(observation, len(self.workers), len(self.router.queue))
        if planner is not None:
            decision = planner.step(observation)
            self.metrics.record_decision(self.now, decision)
            for action in decision.actions:
                self.apply(action)
        self.events.after(self.interval_s, "observe", planner)

    def observe(self) -> Observation:
        """The planner's view of the last interval; resets the interval's statistics."""
        return self.metrics.observe(self.now, self.workers.values(), len(self.router.queue), self.steps.advance)

    def apply(self, action: Action) -> bool:
        """Carry out one planner action; False (counted as refused) when it names no suitable worker."""
        if action.kind == "add":
            self._new_worker(action.role)
        else:
            worker = self._pick(action)
            if worker is None:
                self.actions["refused"] += 1
                return False
            if action.kind == "flip":
                worker.next_role = action.role
            self._set_state(worker, "draining" if action.kind == "remove" else "flipping")
            self._maybe_leave(worker)
        self.actions[action.kind] += 1
        return True

    def _pick(self, action: Action) -> SimWorker | None:
        worker = self.workers.get(action.worker_id) if action.worker_id else None
        if worker is not None:
            if action.kind == "remove":
                return worker if worker.state in ("active", "starting") else None
            return worker if worker.state == "active" and worker.role != action.role else None
        # no id: the least loaded active worker of the role it leaves
        role = action.role if action.kind == "remove" else ("decode" if action.role == "prefill" else "prefill")
        states = ("active", "starting") if action.kind == "remove" else ("active",)
        candidates = [w for w in self.workers.values() if w.role == role and w.state in states]
        if not candidates:
            return None
        return min(candidates, key=lambda w: (w.state != "starting", w.pending_tokens + len(w.batch) + len(w.waiting)))

    def _result(self) -> FleetResult:
        end = self.now
        alive = list(self.workers.values()) + self.gone
        worker_seconds = sum((end if w.left_s is None else w.left_s) - w.added_s for w in alive)
        dropped = sum(1 for r in self.requests if r.finish_s is None)
        return FleetResult(self.requests, worker_seconds, end, self.metrics.timeline, self.steps.gaps,
                           dict(self.actions), self.metrics.decisions, dropped)
