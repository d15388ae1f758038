"""A discrete-event simulator of a disaggregated fleet (prefill + decode workers) at the scale of
hundreds of workers, with a planner in the loop: `tidal sim-fleet`.

`tidal sim` runs real engine cores on threads and keeps wall-clock time; this module keeps only a
simulated clock and a heap of events (no threads, no sleeping), so 256 workers and ten simulated
minutes run in seconds. Step times come from a `StepTimeModel` (a measured `Profile` or a
`TimingModel`).

What it owns: the workers (`SimWorker`), the requests in flight (`SimRequest`), the event heap and
the clock, the router's two choices (which prefill worker, which decode worker), the per-request
records and the per-interval statistics that become the planner's `Observation`.

Lifecycle of one request: arrival -> (remote prefill on a prefill worker, first token, KV transfer)
or (local prefill on its decode worker, when fewer than `local_prefill_tokens` are uncached or no
prefill worker is active) -> decode in a continuous batch -> finish. Lifecycle of one worker:
`starting` (for `startup_s`) -> `active` -> `draining` (remove: no new work, leaves once empty) or
`flipping` (drains, waits `flip_s`, comes back `active` in its new role without a restart).

Approximations (the price of speed; the test file checks the exact cases):
- Prefill: FIFO; a step batches whole waiting prompts up to `token_budget` tokens. A prompt longer
  than the budget runs alone, as `tokens / budget` steps of `token_budget` tokens each (chunked
  prefill at the knee), in one event.
- Decode is a fluid: between two events of a worker (a join, a finish, or a refresh every
  `refresh_s`) its batch is fixed, so every sequence gains one token per step of
  `step_s(0, batch, context)`, the context taken at the start of that span. A worker's "token clock"
  advances by elapsed / step_s (fractional); a request finishes when the clock passes its target.
  So events are per request, not per step.
- A local prefill stalls its decode worker's whole batch for the extra time that prefill adds to one
  step (`step_s(uncached, batch, ctx) - step_s(0, batch, ctx)`).
- KV: a decode worker reserves `input_len + output_len` tokens of its capacity on admission (no
  preemption); a request that doesn't fit, or finds the batch full, waits in that worker's queue.
- Routing: a prompt goes to the prefill worker with the fewest pending tokens while that worker holds
  fewer than `prefill_dispatch_tokens`; otherwise the router holds it (FIFO) until a worker has room,
  so capacity that arrives later takes the backlog. A sequence goes to the least-loaded decode worker
  with a free slot and the KV; otherwise the router holds it, and observations report those as
  waiting on the decode workers (where a router that pushes would have queued them).
- The prefix cache is fleet-wide (ideal KV-aware routing): the workload says how many prompt tokens
  hit.
- ITL: the fleet's inter-token gaps are the decode step times weighted by the tokens they produced
  (the p50/p90 reported); a request's own ITL is its mean gap, (finish - first token) / (OSL - 1),
  which includes its KV transfer and any wait for a decode slot. A request meets the SLO when its
  TTFT and its mean ITL are within targets.

Invariants: a request is never dropped (a worker leaves only when empty; requests with no active
worker to go to wait in the router's queue); worker-seconds count from `add` to departure,
start-up and draining included.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from tidal.config import FLEET_PREFILL_TOKEN_BUDGET
from tidal.planner.types import (Action, Decision, FrontendObservation, Observation, Role,
                                 WorkerObservation, percentile)
from tidal.sim.timing import StepTimeModel


class CachedSteps:
    """A step-time model's answers memoised, the mean decode context rounded to `context_quantum`
    tokens (profile interpolation is the simulator's hottest call otherwise)."""

    def __init__(self, model: StepTimeModel, context_quantum: int = 32):
        self.model = model
        self.quantum = context_quantum
        self._cache: dict[tuple[int, int, int], float] = {}

    def step_s(self, prefill_tokens: int, decode_seqs: int, decode_context_tokens: int) -> float:
        mean_q = round(decode_context_tokens / decode_seqs / self.quantum) if decode_seqs else 0
        key = (prefill_tokens, decode_seqs, mean_q)
        value = self._cache.get(key)
        if value is None:
            value = self.model.step_s(prefill_tokens, decode_seqs, mean_q * self.quantum * decode_seqs)
            self._cache[key] = value
        return value


class PlannerLike(Protocol):
    def step(self, obs: Observation) -> Decision: ...


@dataclass(frozen=True)
class FleetConfig:
    token_budget: int = FLEET_PREFILL_TOKEN_BUDGET
    """Prefill tokens per step on a prefill worker (a profile's knee is a good choice)."""
    max_decode_batch: int = 256
    """Sequences in one decode worker's batch at most."""
    kv_capacity_tokens: int = 491_520
    """KV tokens a decode worker holds (30720 blocks x 16 on the H200 profile)."""
    local_prefill_tokens: int = 256
    """Prompts with fewer uncached tokens prefill on their decode worker (conditional disaggregation)."""
    kv_bytes_per_token: int = 131_072
    """KV bytes per token moved to the decode worker (Llama-3.1-8B: 2 x 32 layers x 8 heads x 128 x 2 B)."""
    prefill_dispatch_tokens: int = 4096
    """The router sends a prefill worker more prompts only while its queue holds fewer tokens than this;
    the rest wait in the router, first come first served, for the first worker with room (0: no limit,
    every prompt goes straight to the least-loaded worker's queue)."""
    transfer_bytes_per_s: float = 40e9
    transfer_latency_s: float = 0.002
    startup_s: float = 30.0
    """A new worker's start-up (weights loaded, warmed) before it takes work."""
    flip_s: float = 1.0
    """A drained worker's role switch (no weight reload)."""
    refresh_s: float = 0.5
    """A decode worker recomputes its step time at least this often (its contexts grow)."""
    context_quantum: int = 32
    """Decode step times are looked up with the mean context rounded to this many tokens (1: exact)."""
    drain_timeout_s: float = 600.0
    """After the last arrival, the run goes on at most this long for requests in flight."""


class SimRequest:
    __slots__ = ("request_id", "arrival_s", "input_len", "output_len", "cached_tokens", "first_token_s",
                 "finish_s", "join_clock", "local_prefill", "worker_id", "kv_tokens")

    def __init__(self, request_id: int, arrival_s: float, input_len: int, output_len: int, cached_tokens: int = 0):
        self.request_id = request_id
        self.arrival_s = arrival_s
        self.input_len = input_len
        self.output_len = max(output_len, 1)
        self.cached_tokens = min(cached_tokens, input_len - 1) if input_len > 1 else 0
        self.first_token_s: float | None = None
        self.finish_s: float | None = None
        self.join_clock = 0.0
        self.local_prefill = False
        self.worker_id = ""
        self.kv_tokens = input_len + self.output_len

    @property
    def uncached_tokens(self) -> int:
        return self.input_len - self.cached_tokens


class _Stats:
    """One worker's figures over the current observation interval."""
    __slots__ = ("steps", "busy_s", "prefill_tokens", "decode_tokens", "batch_steps", "context_steps")

    def __init__(self) -> None:
        self.steps = self.busy_s = 0.0
        self.prefill_tokens = 0
        self.decode_tokens = self.batch_steps = self.context_steps = 0.0


class SimWorker:
    __slots__ = ("worker_id", "role", "state", "added_s", "left_s", "next_role", "switching", "stats",
                 "queue", "pending_tokens", "prefill_busy",
                 "clock", "t_last", "step_s", "batch", "ctx_base", "kv_used", "waiting", "version")

    def __init__(self, worker_id: str, role: Role, added_s: float, state: str = "starting"):
        self.worker_id = worker_id
        self.role = role
        self.state = state
        self.added_s = added_s
        self.left_s: float | None = None
        self.next_role: Role | None = None
        self.switching = False  # flipping: drained, the role switch under way
        self.stats = _Stats()
        # prefill: FIFO of requests, their uncached tokens, whether a step is running
        self.queue: deque[SimRequest] = deque()
        self.pending_tokens = 0
        self.prefill_busy = False
        # decode: a token clock (tokens each running sequence gained), when it was last advanced (may lie
        # in the future during a local-prefill stall), the step time of the current span, the batch as a
        # heap of (finish clock, request id, request), sum over the batch of (context at join - join clock)
        self.clock = 0.0
        self.t_last = 0.0
        self.step_s = 0.0
        self.batch: list[tuple[float, int, SimRequest]] = []
        self.ctx_base = 0.0
        self.kv_used = 0
        self.waiting: deque[SimRequest] = deque()
        self.version = 0

    @property
    def is_empty(self) -> bool:
        return not (self.queue or self.prefill_busy or self.batch or self.waiting)

    def context_sum(self) -> float:
        return self.ctx_base + len(self.batch) * self.clock


@dataclass
class FleetResult:
    requests: list[SimRequest]
    worker_seconds: float
    end_s: float
    timeline: list[dict]
    """One row per planner interval: time, pool sizes by role and state."""
    gaps: list[tuple[float, float, float]]
    """(time_s, gap_ms, tokens): decode step times weighted by the tokens they produced."""
    actions: dict[str, int]
    decisions: list[dict]
    dropped: int


class Fleet:
    """The simulator. `run(arrivals, planner)` plays one workload to the end (see the module docstring)."""

    def __init__(self, config: FleetConfig, model: StepTimeModel, prefill: int, decode: int,
                 interval_s: float = 2.0):
        self.config = config
        self.model = CachedSteps(model) if config.context_quantum > 1 else model
        self._active_cache: dict[str, list[SimWorker]] = {}
        self.interval_s = interval_s
        self.now = 0.0
        self._events: list = []
        self._seq = itertools.count()
        self._ids = itertools.count()
        self.workers: dict[str, SimWorker] = {}
        self.gone: list[SimWorker] = []
        self.prefill_queue: deque[SimRequest] = deque()  # held by the router for a prefill worker
        self.router_queue: deque[SimRequest] = deque()  # held by the router for a decode worker
        self.requests: list[SimRequest] = []
        self.gaps: list[tuple[float, float, float]] = []
        self.timeline: list[dict] = []
        self.decisions: list[dict] = []
        self.actions = {"add": 0, "remove": 0, "flip": 0, "refused": 0}
        self._interval_arrivals: list[SimRequest] = []
        self._interval_first: list[SimRequest] = []
        self._gap_mark = 0
        for role, count in (("prefill", prefill), ("decode", decode)):
            for _ in range(count):
                self._new_worker(role, state="active")

    # ---- events ---------------------------------------------------------------------------------
    def _at(self, time_s: float, kind: str, obj=None, version: int = 0) -> None:
        heapq.heappush(self._events, (time_s, next(self._seq), kind, obj, version))

    def run(self, arrivals: list[SimRequest], planner: PlannerLike | None = None) -> FleetResult:
        self.requests = arrivals
        for r in arrivals:
            self._at(r.arrival_s, "arrive", r)
        last_arrival = arrivals[-1].arrival_s if arrivals else 0.0
        self._at(self.interval_s, "observe", planner)
        handlers = {"arrive": self._on_arrive, "prefill_done": self._on_prefill_done, "kv_ready": self._route_decode,
                    "started": self._on_started, "flipped": self._on_flipped}
        deadline = last_arrival + self.config.drain_timeout_s
        while self._events:
            time_s, _, kind, obj, version = heapq.heappop(self._events)
            if time_s > deadline:
                break
            self.now = time_s
            if kind == "decode":
                self._on_decode(obj, version)
            elif kind == "observe":
                if time_s > last_arrival and self._all_done():
                    break
                self._on_observe(obj)
            else:
                handlers[kind](obj)
        return self._result()

    def _all_done(self) -> bool:
        return all(r.finish_s is not None for r in self.requests)

    # ---- workers --------------------------------------------------------------------------------
    def _new_worker(self, role: Role, state: str = "starting") -> SimWorker:
        worker = SimWorker(f"w{next(self._ids)}", role, self.now, state)
        worker.t_last = self.now
        self.workers[worker.worker_id] = worker
        self._active_cache.clear()
        if state == "starting":
            self._at(self.now + self.config.startup_s, "started", worker)
        return worker

    def _on_started(self, worker: SimWorker) -> None:
        if worker.state == "starting":
            self._set_state(worker, "active")
            self._drain_queues()

    def _on_flipped(self, worker: SimWorker) -> None:
        worker.role, worker.next_role, worker.switching = worker.next_role, None, False
        self._set_state(worker, "active")
        worker.t_last = self.now
        self._drain_queues()

    def _maybe_leave(self, worker: SimWorker) -> None:
        """A draining or flipping worker that has emptied leaves, or starts its role switch."""
        if not worker.is_empty:
            return
        if worker.state == "draining":
            self._set_state(worker, "stopping")
            worker.left_s = self.now
            self.gone.append(self.workers.pop(worker.worker_id))
        elif worker.state == "flipping" and not worker.switching:
            worker.switching = True
            self._at(self.now + self.config.flip_s, "flipped", worker)

    def _active(self, role: str) -> list[SimWorker]:
        active = self._active_cache.get(role)
        if active is None:
            active = [w for w in self.workers.values() if w.role == role and w.state == "active"]
            self._active_cache[role] = active
        return active

    def _set_state(self, worker: SimWorker, state: str) -> None:
        worker.state = state
        self._active_cache.clear()

    # ---- arrivals and prefill -------------------------------------------------------------------
    def _on_arrive(self, request: SimRequest) -> None:
        self._interval_arrivals.append(request)
        self._route_prefill(request)

    def _route_prefill(self, request: SimRequest) -> None:
        prefill = self._active("prefill")
        if request.uncached_tokens < self.config.local_prefill_tokens or not prefill:
            request.local_prefill = True
            self._route_decode(request)
            return
        worker = min(prefill, key=_pending_tokens)
        if self.prefill_queue or not self._prefill_room(worker):
            self.prefill_queue.append(request)  # the router holds it (first come, first served)
            return
        self._send_prefill(worker, request)

    def _prefill_room(self, worker: SimWorker) -> bool:
        limit = self.config.prefill_dispatch_tokens
        return not limit or worker.pending_tokens < limit

    def _send_prefill(self, worker: SimWorker, request: SimRequest) -> None:
        worker.queue.append(request)
        worker.pending_tokens += request.uncached_tokens
        if not worker.prefill_busy:
            self._start_prefill_step(worker)

    def _drain_prefill_queue(self) -> None:
        """Send held prompts to prefill workers with room; with no prefill worker left, to decode workers."""
        queue = self.prefill_queue
        while queue:
            prefill = self._active("prefill")
            if not prefill:
                while queue:
                    request = queue.popleft()
                    request.local_prefill = True
                    self._route_decode(request)
                return
            worker = min(prefill, key=_pending_tokens)
            if not self._prefill_room(worker):
                return
            self._send_prefill(worker, queue.popleft())

    def _start_prefill_step(self, worker: SimWorker) -> None:
        budget = self.config.token_budget
        head = worker.queue[0]
        if head.uncached_tokens >= budget:
            batch = [worker.queue.popleft()]
            tokens = head.uncached_tokens
            steps = tokens / budget
            step_s = steps * self.model.step_s(budget, 0, 0)
        else:
            batch, tokens = [], 0
            while worker.queue and tokens + worker.queue[0].uncached_tokens <= budget:
                request = worker.queue.popleft()
                batch.append(request)
                tokens += request.uncached_tokens
            steps = 1.0
            step_s = self.model.step_s(tokens, 0, 0)
        worker.prefill_busy = True
        worker.stats.steps += steps
        worker.stats.busy_s += step_s
        worker.stats.prefill_tokens += tokens
        self._at(self.now + step_s, "prefill_done", (worker, batch, tokens))

    def _on_prefill_done(self, payload) -> None:
        worker, batch, tokens = payload
        worker.prefill_busy = False
        worker.pending_tokens -= tokens
        config = self.config
        for request in batch:
            request.first_token_s = self.now
            self._interval_first.append(request)
            if request.output_len <= 1:
                request.finish_s = self.now
                continue
            transfer_s = config.transfer_latency_s + request.input_len * config.kv_bytes_per_token / config.transfer_bytes_per_s
            self._at(self.now + transfer_s, "kv_ready", request)
        self._drain_prefill_queue()
        if worker.queue and not worker.prefill_busy:
            self._start_prefill_step(worker)
        else:
            self._maybe_leave(worker)

    # ---- decode ---------------------------------------------------------------------------------
    def _route_decode(self, request: SimRequest) -> None:
        if self.router_queue or not self._send_decode(request):
            self.router_queue.append(request)

    def _send_decode(self, request: SimRequest) -> bool:
        """To the least-loaded active decode worker, if it has a free slot and the KV (or is empty)."""
        decode = self._active("decode")
        if not decode:
            return False
        worker = min(decode, key=_decode_load)
        config = self.config
        empty = not (worker.batch or worker.waiting)
        room = (not worker.waiting and len(worker.batch) < config.max_decode_batch
                and worker.kv_used + request.kv_tokens <= config.kv_capacity_tokens)
        if not (empty or room):
            return False
        request.worker_id = worker.worker_id
        self._advance(worker)
        worker.waiting.append(request)
        self._admit(worker)
        self._reschedule(worker)
        return True

    def _drain_decode_queue(self) -> None:
        queue = self.router_queue
        while queue and self._send_decode(queue[0]):
            queue.popleft()

    def _drain_queues(self) -> None:
        self._drain_prefill_queue()
        self._drain_decode_queue()

    def _advance(self, worker: SimWorker) -> None:
        """Move the worker's token clock to now at the current span's step time."""
        start = worker.t_last
        if self.now <= start:
            return
        worker.t_last = self.now
        if not worker.batch or worker.step_s <= 0:
            return
        elapsed = self.now - start
        steps = elapsed / worker.step_s
        batch = len(worker.batch)
        worker.clock += steps
        stats = worker.stats
        stats.steps += steps
        stats.busy_s += elapsed
        stats.decode_tokens += steps * batch
        stats.batch_steps += steps * batch
        stats.context_steps += steps * worker.context_sum()
        self.gaps.append((self.now, worker.step_s * 1000, steps * batch))

    def _admit(self, worker: SimWorker) -> None:
        """Move waiting requests into the batch while there is room (batch size and KV)."""
        config = self.config
        while worker.waiting and len(worker.batch) < config.max_decode_batch:
            request = worker.waiting[0]
            if worker.batch and worker.kv_used + request.kv_tokens > config.kv_capacity_tokens:
                break
            worker.waiting.popleft()
            worker.kv_used += request.kv_tokens
            if request.local_prefill:
                self._local_prefill(worker, request)
            else:
                remaining = request.output_len - 1
                self._join(worker, request, request.input_len + 1, remaining)

    def _join(self, worker: SimWorker, request: SimRequest, context: int, remaining_tokens: int) -> None:
        start_clock = worker.clock
        request.join_clock = start_clock
        worker.ctx_base += context - start_clock
        heapq.heappush(worker.batch, (start_clock + remaining_tokens, request.request_id, request))

    def _local_prefill(self, worker: SimWorker, request: SimRequest) -> None:
        """The prompt prefills inside one of the worker's steps: the batch stalls for the extra time."""
        batch = len(worker.batch)
        context = worker.context_sum()
        extra_s = self.model.step_s(request.uncached_tokens, batch, int(context))
        if batch:
            extra_s -= self.model.step_s(0, batch, int(context))
            self.gaps.append((self.now, (extra_s + worker.step_s) * 1000, batch))
        resume = max(worker.t_last, self.now) + extra_s
        worker.t_last = resume
        worker.stats.busy_s += extra_s
        worker.stats.prefill_tokens += request.uncached_tokens
        request.first_token_s = resume
        self._interval_first.append(request)
        self._join(worker, request, request.input_len + 1, request.output_len - 1)

    def _reschedule(self, worker: SimWorker) -> None:
        worker.version += 1
        if not worker.batch:
            worker.step_s = 0.0
            return
        batch = len(worker.batch)
        worker.step_s = self.model.step_s(0, batch, int(worker.context_sum()))
        start = max(worker.t_last, self.now)
        to_finish_s = max(worker.batch[0][0] - worker.clock, 0.0) * worker.step_s
        self._at(start + min(to_finish_s, self.config.refresh_s), "decode", worker, worker.version)

    def _on_decode(self, worker: SimWorker, version: int) -> None:
        if version != worker.version or worker.state == "stopping":
            return
        self._advance(worker)
        while worker.batch and worker.batch[0][0] <= worker.clock + 1e-9:
            _, _, request = heapq.heappop(worker.batch)
            request.finish_s = self.now
            worker.kv_used -= request.kv_tokens
            worker.ctx_base -= request.input_len + 1 - request.join_clock
        self._admit(worker)
        self._reschedule(worker)
        if self.router_queue:
            self._drain_decode_queue()
        if not worker.batch:
            self._maybe_leave(worker)

    # ---- the planner ----------------------------------------------------------------------------
    def _on_observe(self, planner: PlannerLike | None) -> None:
        observation = self.observe()
        self._record_timeline(observation)
        if planner is not None:
            decision = planner.step(observation)
            self.decisions.append({"time_s": self.now, "target_prefill": decision.target_prefill,
                                   "target_decode": decision.target_decode, "loop": decision.loop,
                                   "actions": [(a.kind, a.role, a.reason) for a in decision.actions],
                                   "explanation": decision.explanation})
            for action in decision.actions:
                self.apply(action)
        self._at(self.now + self.interval_s, "observe", planner)

    def apply(self, action: Action) -> bool:
        """Carry out one planner action; False (counted as refused) when it names no suitable worker."""
        if action.kind == "add":
            self._new_worker(action.role)
        else:
            worker = self._pick(action)
            if worker is None:
                self.actions["refused"] += 1
                return False
            if action.kind == "remove":
                self._set_state(worker, "draining")
                self._maybe_leave(worker)
            else:
                worker.next_role = action.role
                self._set_state(worker, "flipping")
                self._maybe_leave(worker)
            self._drain_queues()  # with no prefill worker left, held prompts go to decode workers
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

    def observe(self) -> Observation:
        """The planner's view of the last interval; resets the interval's statistics."""
        decode = self._active("decode")
        held = len(self.router_queue)  # reported as waiting on the decode workers, where a pushing router puts them
        shares = {w.worker_id: held // len(decode) + (i < held % len(decode)) for i, w in enumerate(decode)}
        workers = tuple(self._observe_worker(w, shares.get(w.worker_id, 0)) for w in self.workers.values())
        arrivals, firsts = self._interval_arrivals, self._interval_first
        gaps = self.gaps[self._gap_mark:]
        self._interval_arrivals, self._interval_first, self._gap_mark = [], [], len(self.gaps)
        ttft_ms = [(r.first_token_s - r.arrival_s) * 1000 for r in firsts]
        isl = sum(r.input_len for r in arrivals)
        frontend = FrontendObservation(
            request_rate=len(arrivals) / self.interval_s,
            ttft_ms_p50=percentile(ttft_ms, 50), ttft_ms_p90=percentile(ttft_ms, 90),
            itl_ms_p50=weighted_percentile(gaps, 50), itl_ms_p90=weighted_percentile(gaps, 90),
            isl_mean=isl / len(arrivals) if arrivals else None,
            osl_mean=sum(r.output_len for r in arrivals) / len(arrivals) if arrivals else None,
            prefix_hit_rate=sum(r.cached_tokens for r in arrivals) / isl if isl else 0.0,
            queue_depth=len(self.prefill_queue), num_requests=len(arrivals))
        return Observation(time_s=self.now, interval_s=self.interval_s, frontend=frontend, workers=workers)

    def _observe_worker(self, worker: SimWorker, held: int = 0) -> WorkerObservation:
        if worker.role == "decode":
            self._advance(worker)  # a flipping worker reports the role it is becoming (the planner's contract)
        stats, worker.stats = worker.stats, _Stats()
        steps = stats.steps
        return WorkerObservation(
            worker_id=worker.worker_id, role=worker.next_role or worker.role, state=worker.state,
            num_running=len(worker.batch) + (1 if worker.prefill_busy else 0),
            num_waiting=len(worker.queue) + len(worker.waiting) + held, pending_prefill_tokens=worker.pending_tokens,
            kv_used_fraction=worker.kv_used / self.config.kv_capacity_tokens, steps=round(steps),
            kv_capacity_tokens=self.config.kv_capacity_tokens,
            step_s_mean=stats.busy_s / steps if steps else 0.0, prefill_tokens=stats.prefill_tokens,
            decode_tokens=round(stats.decode_tokens),
            decode_batch_mean=stats.batch_steps / steps if steps else 0.0,
            context_tokens_mean=stats.context_steps / stats.batch_steps if stats.batch_steps else 0.0)

    def _record_timeline(self, observation: Observation) -> None:
        row = {"time_s": self.now, "prefill": 0, "decode": 0, "starting": 0, "draining": 0, "flipping": 0,
               "alive": len(self.workers), "prefill_queue": len(self.prefill_queue), "decode_queue": len(self.router_queue)}
        for w in observation.workers:
            if w.state == "active":
                row[w.role] += 1
            elif w.state in row:
                row[w.state] += 1
        self.timeline.append(row)

    def _result(self) -> FleetResult:
        end = self.now
        alive = list(self.workers.values()) + self.gone
        worker_seconds = sum((end if w.left_s is None else w.left_s) - w.added_s for w in alive)
        dropped = sum(1 for r in self.requests if r.finish_s is None)
        return FleetResult(self.requests, worker_seconds, end, self.timeline, self.gaps, dict(self.actions),
                           self.decisions, dropped)


def _pending_tokens(worker: SimWorker) -> int:
    return worker.pending_tokens


def _decode_load(worker: SimWorker) -> tuple[int, int]:
    return len(worker.batch) + len(worker.waiting), worker.kv_used


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
