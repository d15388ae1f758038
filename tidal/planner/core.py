"""The SLA planner's pure core: observations in, decisions out. No I/O, no clock but `obs.time_s`.

`Planner.step(obs)` is called every `reactive_interval_s` by an adapter (the running deployment's
planner loop, or the simulator). Each call runs one of two loops:

- predictive (whenever `predictive_interval_s` has passed since the last one, or since the first
  call): feeds the interval's request rate, ISL and OSL to the predictors and sizes both pools with
  the `PerfModel` x (1 + headroom) for the highest rate forecast over the lead time (the start-up
  time of a worker, as seen or configured, plus one interval: the soonest capacity ordered now can
  serve), never below the rate seen in the last few calls. It moves toward those targets: flips
  first (one pool over its target, the other under), then adds; then removes the excess of each
  pool that is idle (slack) and has not grown within `scale_down_cooldown_s`;
- reactive (every other call): a pool is in trouble when its signals cross their targets (prefill:
  TTFT P90 over the SLO, or the prefill queue would take more than `queue_wait_fraction` of the TTFT
  target to drain; decode: ITL P90 or decode step time over the target, or KV use over
  `kv_pressure`). A pool in trouble is sized at once for the rate seen in the last few calls plus
  its queue drained within `backlog_clear_s` (one worker when that model finds none missing and
  none is on its way); one worker of it may come by a flip from the other pool when that pool has
  slack and more workers than the current rate needs, the rest are added within the budget
  (reason `at_budget` when the budget stops it).

State it owns: the predictors, the window of observations since the last predictive loop, the last
few calls' arrivals, the start-up time it has seen, when each pool last grew, and the workers it
has acted on that have not yet finished (pending).

Invariants:
- prefill + decode (+ `both`) workers never exceed `max_workers`; no action takes a pool below
  its minimum, and a pool under its minimum gets a worker first (reason `minimum`).
- A worker in transition (starting, draining, flipping, stopping, or acted on and not yet seen
  finished) counts toward the pool it is becoming and is never picked for another action.
- No removal from, and no flip away from, a pool within `scale_down_cooldown_s` of its growing.

Contract with the adapters: after a decision, the next observation shows an added worker as
`starting`; a worker in state `flipping` reports the role it is becoming (the planner also
remembers the flips it ordered, so a `draining` worker it is flipping counts toward its new role).
Aggregated (`both`) workers count toward the budget only; the planner sizes prefill and decode.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from tidal.planner.perf_model import PerfModel
from tidal.planner.predictors import MovingAverage, Predictor, forecast_peak, make_predictor
from tidal.planner.types import (Action, Decision, FrontendObservation, Observation, PlannerConfig, Role,
                                 WorkerObservation)

POOLS: tuple[Role, Role] = ("prefill", "decode")


@dataclass(frozen=True)
class Thresholds:
    queue_wait_fraction: float = 0.5
    """TTFT is in trouble when the queued prefill tokens take longer than this share of the TTFT
    target to drain at the prefill pool's throughput."""
    kv_pressure: float = 0.9
    """ITL is in trouble when the decode workers' mean KV use exceeds this."""
    slack_fraction: float = 0.6
    """A pool has slack (may give a worker away, or lose one when idle) when each of its signals is
    under this share of its target."""
    pending_timeout_s: float = 300.0
    """Forget an action not seen finished after this long (an actuator that failed)."""
    decode_queue_workers: float = 0.25
    """The decode pool is in trouble when the requests waiting for a decode slot would fill this
    share of one worker's batch."""
    trouble_calls: int = 2
    """The reactive loop grows a pool only after it has been in trouble (or over capacity) this many
    calls in a row: one huge prompt in the queue, or one noisy interval, is not a trend."""
    recent_calls: int = 5
    """The rate "seen now" is the mean over this many calls (the latest observations)."""
    lengths_window_s: float = 60.0
    """ISL, OSL and prefix hit rate "seen now" are request-weighted means decaying with this time
    constant (one interval's mean of a heavy-tailed trace is noise)."""
    length_windows: int = 6
    """The predictive loop forecasts ISL and OSL by the mean of this many windows."""
    scale_down_window_s: float = 60.0
    """With no period found in the load, a pool is only cut to the largest target of this long
    (a dip in an aperiodic load is no reason to give back capacity that takes a start-up to return);
    with a period, the forecast already says what is coming and the cut is to the latest target."""
    startup_alpha: float = 0.5
    """Weight of the newest start-up time seen in the planner's estimate (EWMA)."""


@dataclass
class _Pool:
    """One pool as counted in one observation."""

    role: Role
    active: list[WorkerObservation] = field(default_factory=list)  # pickable workers
    incoming: int = 0  # workers becoming this role (starting, flipping or draining into it)

    @property
    def count(self) -> int:
        return len(self.active) + self.incoming


@dataclass(frozen=True)
class _Health:
    """A pool's signals as ratios to their targets (> 1: over the target)."""

    trouble: str | None  # the reason label when in trouble
    worst_ratio: float
    backlog_workers: float = 0.0  # workers it would take to drain its queue within backlog_clear_s


@dataclass
class _Window:
    """What the frontend reported since the last predictive loop."""

    span_s: float = 0.0
    arrivals: float = 0.0
    isl_weighted: tuple[float, float] = (0.0, 0.0)  # (sum of weight x ISL, sum of weights)
    osl_weighted: tuple[float, float] = (0.0, 0.0)
    prefix_hit_rate: float = 0.0

    def add(self, frontend: FrontendObservation, interval_s: float) -> None:
        arrivals = frontend.request_rate * interval_s
        weight = frontend.num_requests or arrivals or 1e-9
        self.span_s += interval_s
        self.arrivals += arrivals
        if frontend.isl_mean is not None:
            self.isl_weighted = (self.isl_weighted[0] + weight * frontend.isl_mean, self.isl_weighted[1] + weight)
        if frontend.osl_mean is not None:
            self.osl_weighted = (self.osl_weighted[0] + weight * frontend.osl_mean, self.osl_weighted[1] + weight)
        self.prefix_hit_rate = frontend.prefix_hit_rate

    def rate(self) -> float:
        return self.arrivals / self.span_s if self.span_s > 0 else 0.0

    @staticmethod
    def mean(weighted: tuple[float, float]) -> float | None:
        return weighted[0] / weighted[1] if weighted[1] > 0 else None


class Planner:
    def __init__(self, config: PlannerConfig, perf: PerfModel | None = None, thresholds: Thresholds | None = None):
        if config.min_prefill + config.min_decode > config.max_workers:
            raise ValueError(f"the minimums ({config.min_prefill} prefill + {config.min_decode} decode) exceed "
                             f"max_workers {config.max_workers}")
        self.config = config
        self.perf = perf or PerfModel.default()
        self.thresholds = thresholds or Thresholds()
        self.rate_predictor: Predictor = make_predictor(config.predictor)
        self.isl_predictor: Predictor = MovingAverage(self.thresholds.length_windows)
        self.osl_predictor: Predictor = MovingAverage(self.thresholds.length_windows)
        self._window = _Window()
        self._last_predictive_s: float | None = None
        self._last_grew_s: dict[Role, float] = {"prefill": -math.inf, "decode": -math.inf}
        self._pending: dict[str, tuple[Role | None, float]] = {}  # worker_id -> (role it becomes, since)
        self._have: dict[Role, int] = {"prefill": 0, "decode": 0}
        self._recent: deque[tuple[float, float]] = deque(maxlen=self.thresholds.recent_calls)  # (span, arrivals)
        self._length_sums = [0.0, 0.0, 0.0, 0.0]  # decayed sums: weight, weight x ISL, x OSL, x prefix hit
        self._recent_targets: deque[tuple[float, dict[Role, int]]] = deque()
        self.startup_s = config.worker_startup_s  # start-up time: configured, then as seen
        self._starting_since: dict[str, float] = {}
        self._troubled: dict[Role, int] = {"prefill": 0, "decode": 0}  # calls in a row in trouble

    def step(self, obs: Observation) -> Decision:
        self.perf.observe(obs.workers)
        self._window.add(obs.frontend, obs.interval_s)
        self._recent.append((obs.interval_s, obs.frontend.request_rate * obs.interval_s))
        self._fold_lengths(obs)
        self._watch_startups(obs)
        self._forget_finished(obs)
        pools, num_both = self._count(obs)
        health = {"prefill": self._prefill_health(obs, pools), "decode": self._decode_health(obs, pools)}
        self._have = {role: pools[role].count for role in POOLS}  # for the log line, before any action
        if self._last_predictive_s is None:
            self._last_predictive_s = obs.time_s  # the first window starts now
        if obs.time_s - self._last_predictive_s >= self.config.predictive_interval_s - 1e-9:
            return self._predictive(obs, pools, num_both, health)
        return self._reactive(obs, pools, num_both, health)

    # ---- what it has seen ----------------------------------------------------------------------
    def rate_now(self) -> float:
        """Arrivals per second over the last `recent_calls` observations."""
        span = sum(span for span, _ in self._recent)
        return sum(arrivals for _, arrivals in self._recent) / span if span > 0 else 0.0

    @property
    def _lengths(self) -> tuple[float, float, float]:
        """ISL, OSL and prefix hit rate seen now (request-weighted, decaying)."""
        weight, isl, osl, hit = self._length_sums
        return (isl / weight, osl / weight, hit / weight) if weight > 0 else (0.0, 0.0, 0.0)

    def _fold_lengths(self, obs: Observation) -> None:
        front = obs.frontend
        decay = math.exp(-obs.interval_s / self.thresholds.lengths_window_s)
        self._length_sums = [x * decay for x in self._length_sums]
        if front.isl_mean is not None and front.osl_mean is not None:
            weight = max(front.num_requests, 1)
            for i, value in enumerate((1.0, front.isl_mean, front.osl_mean, front.prefix_hit_rate)):
                self._length_sums[i] += weight * value

    def lead_s(self) -> float:
        """How far ahead the predictive loop sizes: a worker's start-up plus one interval."""
        return self.startup_s + self.config.predictive_interval_s

    def _watch_startups(self, obs: Observation) -> None:
        """Time each worker from first seen `starting` to `active` (plus one interval: it was ordered
        before it was seen) and fold that into `startup_s`."""
        for w in obs.workers:
            if w.state == "starting":
                self._starting_since.setdefault(w.worker_id, obs.time_s - obs.interval_s)
            elif w.worker_id in self._starting_since:
                since = self._starting_since.pop(w.worker_id)
                if w.state == "active":
                    a = self.thresholds.startup_alpha
                    self.startup_s = (1 - a) * self.startup_s + a * (obs.time_s - since)
        alive = {w.worker_id for w in obs.workers}
        for worker_id in [i for i in self._starting_since if i not in alive]:
            del self._starting_since[worker_id]

    # ---- counting ------------------------------------------------------------------------------
    def _forget_finished(self, obs: Observation) -> None:
        """Drop pending entries whose worker left, finished its flip, or timed out."""
        seen = {w.worker_id: w for w in obs.workers}
        for worker_id, (becoming, since_s) in list(self._pending.items()):
            w = seen.get(worker_id)
            done = (w is None or (becoming is not None and w.state == "active" and w.role == becoming)
                    or obs.time_s - since_s > self.thresholds.pending_timeout_s)
            if done:
                del self._pending[worker_id]

    def _becoming(self, w: WorkerObservation) -> Role | None:
        """The pool a worker counts toward: its role, or the one it is becoming; None when leaving."""
        if w.worker_id in self._pending:
            return self._pending[w.worker_id][0]
        if w.state in ("active", "starting", "flipping"):
            return w.role
        return None  # draining (for removal) or stopping

    def _count(self, obs: Observation) -> tuple[dict[Role, _Pool], int]:
        pools: dict[Role, _Pool] = {role: _Pool(role) for role in POOLS}
        num_both = 0
        for w in obs.workers:
            becoming = self._becoming(w)
            if becoming == "both":
                num_both += 1
            elif becoming is not None:
                pickable = w.state == "active" and w.worker_id not in self._pending
                if pickable:
                    pools[becoming].active.append(w)
                else:
                    pools[becoming].incoming += 1
        return pools, num_both

    # ---- health --------------------------------------------------------------------------------
    def _prefill_health(self, obs: Observation, pools: dict[Role, _Pool]) -> _Health:
        """TTFT P90 against the SLO, and the prefill queue's drain time against its share of it."""
        ttft_ms = self.config.slo.ttft_ms
        front = obs.frontend
        ttft_ratio = (front.ttft_ms_p90 or 0.0) / ttft_ms
        # Prompts wait on the prefill workers, or on every worker when there are none (local prefill).
        serving = pools["prefill"].active or [w for w in obs.workers if w.state == "active"]
        queued_tokens = sum(w.pending_prefill_tokens for w in serving)
        queued_tokens += front.queue_depth * (front.isl_mean or 0.0) * (1 - front.prefix_hit_rate)
        throughput = len(serving) * self.perf.prefill_tokens_per_s(ttft_ms)
        wait_s = queued_tokens / throughput if throughput > 0 else (math.inf if queued_tokens > 0 else 0.0)
        queue_ratio = wait_s / (self.thresholds.queue_wait_fraction * ttft_ms / 1000)
        trouble = "ttft_over_slo" if ttft_ratio > 1 else "prefill_queue" if queue_ratio > 1 else None
        backlog = queued_tokens / (self.perf.prefill_tokens_per_s(ttft_ms) * self.config.backlog_clear_s)
        return _Health(trouble, max(ttft_ratio, queue_ratio), backlog)

    def _decode_health(self, obs: Observation, pools: dict[Role, _Pool]) -> _Health:
        """ITL P90 and the decode workers' step time against the ITL target; their KV use; requests
        waiting for a decode slot (their backlog is those requests over a worker's batch)."""
        itl_ms = self.config.slo.itl_ms
        itl_ratio = (obs.frontend.itl_ms_p90 or 0.0) / itl_ms
        decoding = pools["decode"].active or [w for w in obs.workers if w.state == "active" and w.role == "both"]
        steps = sum(w.steps for w in decoding)
        step_ms = 1000 * sum(w.steps * w.step_s_mean for w in decoding) / steps if steps else 0.0
        step_ratio = step_ms / itl_ms
        kv_ratio = (sum(w.kv_used_fraction for w in decoding) / len(decoding) / self.thresholds.kv_pressure
                    if decoding else 0.0)
        isl, osl, _ = self._lengths
        batch = self.perf.decode_batch(itl_ms, isl + osl / 2, isl + osl)
        waiting = sum(w.num_waiting for w in pools["decode"].active)
        backlog = waiting / batch
        queue_ratio = backlog / self.thresholds.decode_queue_workers
        if itl_ratio > 1 or step_ratio > 1:
            trouble = "itl_over_slo"
        elif kv_ratio > 1:
            trouble = "kv_pressure"
        else:
            trouble = "decode_queue" if queue_ratio > 1 else None
        return _Health(trouble, max(itl_ratio, step_ratio, kv_ratio, queue_ratio), backlog)

    def _has_slack(self, health: _Health) -> bool:
        return health.trouble is None and health.worst_ratio < self.thresholds.slack_fraction

    def _may_give(self, pool: _Pool, health: _Health, time_s: float, need_slack: bool) -> bool:
        """Whether `pool` may lose a worker now: above its minimum, one to pick, not grown within the
        cooldown, and idle enough (slack, or at least not in trouble)."""
        cooled = time_s - self._last_grew_s[pool.role] >= self.config.scale_down_cooldown_s
        calm = self._has_slack(health) if need_slack else health.trouble is None
        return pool.count > self._minimum(pool.role) and bool(pool.active) and cooled and calm

    def _minimum(self, role: Role) -> int:
        return self.config.min_prefill if role == "prefill" else self.config.min_decode

    def _decode_absorbs(self, prefill_need: float, decode_workers: int) -> bool:
        """Whether `decode_workers` can take a prefill need of `prefill_need` workers on themselves
        (local prefill), so that no prefill worker is needed: `min_prefill` 0 and the need at most
        `decode_prefill_share` of them."""
        return (self.config.min_prefill == 0 and self.config.decode_prefill_share > 0
                and prefill_need <= self.config.decode_prefill_share * decode_workers)

    def _can_spare(self, source: _Pool, pools: dict[Role, _Pool], health: dict[Role, _Health], time_s: float) -> bool:
        """Whether `source` may give a worker to the other pool now: it has slack, and what stays
        still serves the rate now, or, for the last prefill worker, the decode workers it joins
        absorb the prefill."""
        if not self._may_give(source, health[source.role], time_s, need_slack=True):
            return False
        need = self._need_now(source.role)
        if source.count - 1 >= math.ceil(need - 1e-9):
            return True
        return source.role == "prefill" and source.count == 1 and self._decode_absorbs(need, pools["decode"].count + 1)

    # ---- actions -------------------------------------------------------------------------------
    def _flip(self, source: _Pool, target: _Pool, reason: str, time_s: float) -> Action:
        worker = _least_loaded(source.active)
        source.active.remove(worker)
        target.incoming += 1
        self._pending[worker.worker_id] = (target.role, time_s)
        self._last_grew_s[target.role] = time_s
        return Action("flip", target.role, worker.worker_id, reason)

    def _add(self, target: _Pool, reason: str, time_s: float) -> Action:
        target.incoming += 1
        self._last_grew_s[target.role] = time_s
        return Action("add", target.role, None, reason)

    def _remove(self, source: _Pool, reason: str, time_s: float) -> Action:
        worker = _least_loaded(source.active)
        source.active.remove(worker)
        self._pending[worker.worker_id] = (None, time_s)
        return Action("remove", source.role, worker.worker_id, reason)

    def _budget_left(self, pools: dict[Role, _Pool], num_both: int) -> int:
        return self.config.max_workers - num_both - sum(p.count for p in pools.values())

    # ---- the reactive loop ---------------------------------------------------------------------
    @staticmethod
    def _saw_latencies(obs: Observation, role: Role) -> bool:
        """Whether this call's frontend figures say anything about `role`'s latency target."""
        front = obs.frontend
        return (front.ttft_ms_p90 if role == "prefill" else front.itl_ms_p90) is not None

    def _need_now(self, role: Role) -> float:
        """Workers `role` needs (x (1 + headroom)) for the rate seen now at the latest lengths."""
        rate, (isl, osl, hit) = self.rate_now(), self._lengths
        slo = self.config.slo
        if role == "prefill":
            need = self.perf.prefill_workers_needed(rate, isl, hit, slo.ttft_ms)
        else:
            need = self.perf.decode_workers_needed(rate, isl, osl, slo.itl_ms)
        return need * (1 + self.config.headroom)

    def _reactive(self, obs: Observation, pools: dict[Role, _Pool], num_both: int,
                  health: dict[Role, _Health]) -> Decision:
        """Size each pool in trouble (or over capacity for the rate now) at once; flip one worker
        where the other pool can spare it (a flip needs no budget); cut both wants to the budget
        together; add the rest."""
        want: dict[Role, int] = {}
        reasons: dict[Role, str] = {}
        for role in POOLS:
            pool = pools[role]
            need = self._need_now(role)
            over = need / (1 + self.config.headroom) > pool.count  # estimated utilisation above 1
            troubled = health[role].trouble is not None or over
            if troubled:
                self._troubled[role] += 1
            elif self._saw_latencies(obs, role):  # a call with no finished request neither counts nor clears
                self._troubled[role] = 0
            if pool.count < self._minimum(role):
                want[role], reasons[role] = self._minimum(role), "minimum"
            elif troubled and self._troubled[role] >= self.thresholds.trouble_calls:
                wanted = math.ceil(need + health[role].backlog_workers - 1e-9)
                if wanted <= pool.count and pool.incoming == 0 and health[role].trouble is not None:
                    wanted = pool.count + 1  # trouble the model does not explain: one more, then look again
                want[role] = max(pool.count, wanted)
                reasons[role] = health[role].trouble or "over_capacity"
            else:
                want[role] = pool.count
        actions: list[Action] = []
        for role in POOLS:  # flips first: they need no budget (one at most per call)
            pool, other = pools[role], pools[_other(role)]
            if (want[role] > pool.count and reasons[role] != "minimum" and self.config.allow_flips and not actions
                    and want[other.role] <= other.count and self._can_spare(other, pools, health, obs.time_s)):
                actions.append(self._flip(other, pool, reasons[role], obs.time_s))
                want[other.role] = other.count  # the worker it gave is not missing there
        held = ""
        budget = self.config.max_workers - num_both
        if sum(want.values()) > budget:  # cut the pool furthest over its need for the rate now first
            held = "at_budget"
            while sum(want.values()) > budget:
                cuttable = [r for r in POOLS if want[r] > max(pools[r].count, self._minimum(r))]
                if not cuttable:
                    break
                role = max(cuttable, key=lambda r: want[r] / max(self._need_now(r), 1e-9))
                want[role] -= 1
        for role in POOLS:
            pool = pools[role]
            missing = want[role] - pool.count
            while missing > 0 and self._budget_left(pools, num_both) > 0:
                actions.append(self._add(pool, reasons[role], obs.time_s))
                missing -= 1
            if missing > 0:
                held = "at_budget"
        return Decision(obs.time_s, pools["prefill"].count, pools["decode"].count, tuple(actions), "reactive",
                        self._explain(obs, health, held=held), reason=held)

    # ---- the predictive loop -------------------------------------------------------------------
    def _predictive(self, obs: Observation, pools: dict[Role, _Pool], num_both: int,
                    health: dict[Role, _Health]) -> Decision:
        self._last_predictive_s = obs.time_s
        window, self._window = self._window, _Window()
        rate, isl, osl = self._forecast(window)
        rate = max(rate, self.rate_now())
        slo = self.config.slo
        needs = {"prefill": self.perf.prefill_workers_needed(rate, isl, window.prefix_hit_rate, slo.ttft_ms),
                 "decode": self.perf.decode_workers_needed(rate, isl, osl, slo.itl_ms)}
        targets, cut = self._targets(needs, num_both)
        floors = self._scale_down_floors(targets, obs.time_s)
        actions, held = self._move_toward(targets, floors, pools, num_both, health, obs.time_s)
        held = "at_budget" if cut else held
        forecast = (f"rate {window.rate():.2f} req/s -> {rate:.2f} req/s (the highest forecast over the next "
                    f"{self.lead_s():.0f} s, or the rate now), ISL {isl:.0f}, OSL {osl:.0f}")
        return Decision(obs.time_s, targets["prefill"], targets["decode"], tuple(actions), "predictive",
                        self._explain(obs, health, forecast=forecast, needs=needs, held=held), reason=held)

    def _forecast(self, window: _Window) -> tuple[float, float, float]:
        """Feed the window to the predictors; forecast the highest rate over the lead time, and ISL
        and OSL one interval ahead."""
        self.rate_predictor.update(window.rate())
        isl, osl = _Window.mean(window.isl_weighted), _Window.mean(window.osl_weighted)
        if isl is not None:
            self.isl_predictor.update(isl)
        if osl is not None:
            self.osl_predictor.update(osl)
        horizon = math.ceil(self.lead_s() / self.config.predictive_interval_s - 1e-9)
        return (forecast_peak(self.rate_predictor, horizon), self.isl_predictor.forecast(1),
                self.osl_predictor.forecast(1))

    def _targets(self, needs: dict[Role, float], num_both: int) -> tuple[dict[Role, int], bool]:
        """ceil(need x (1 + headroom)), at least the minimum; cut to the budget (the larger target
        above its minimum gives first). Also says whether it was cut."""
        scale = 1 + self.config.headroom
        targets = {role: max(self._minimum(role), math.ceil(needs[role] * scale - 1e-9)) for role in POOLS}
        budget = self.config.max_workers - num_both
        cut = sum(targets.values()) > budget
        if cut and self._decode_absorbs(needs["prefill"] * scale, budget):
            # Short of budget, and a prefill need the decode workers can take on: all of it is decode.
            return {"prefill": 0, "decode": budget}, cut
        while sum(targets.values()) > budget:
            role = max(POOLS, key=lambda r: (targets[r] - self._minimum(r), r == "decode"))
            if targets[role] <= self._minimum(role):
                break
            targets[role] -= 1
        return targets, cut

    def _scale_down_floors(self, targets: dict[Role, int], time_s: float) -> dict[Role, int]:
        """What each pool may be cut to: the latest target when the rate predictor knows the load's
        period, else the largest target of the last `scale_down_window_s`."""
        self._recent_targets.append((time_s, dict(targets)))
        while self._recent_targets[0][0] < time_s - self.thresholds.scale_down_window_s:
            self._recent_targets.popleft()
        if self.rate_predictor.period is not None:
            return dict(targets)
        return {role: max(t[role] for _, t in self._recent_targets) for role in POOLS}

    def _move_toward(self, targets: dict[Role, int], floors: dict[Role, int], pools: dict[Role, _Pool],
                     num_both: int, health: dict[Role, _Health], time_s: float) -> tuple[list[Action], str]:
        actions: list[Action] = []
        for role in POOLS:  # flips: one pool over its target, the other under
            pool, other = pools[role], pools[_other(role)]
            while (self.config.allow_flips and pool.count < targets[role] and other.count > targets[other.role]
                   and self._may_give(other, health[other.role], time_s, need_slack=False)):
                actions.append(self._flip(other, pool, "forecast", time_s))
        held = ""
        for role in sorted(POOLS, key=lambda r: pools[r].count - targets[r]):  # adds: the largest deficit first
            while pools[role].count < targets[role]:
                if self._budget_left(pools, num_both) <= 0:
                    held = "at_budget"
                    break
                actions.append(self._add(pools[role], "forecast", time_s))
        for role in POOLS:  # removals: an idle pool's whole excess, its least-loaded workers
            if self._may_give(pools[role], health[role], time_s, need_slack=True):
                while pools[role].count > floors[role] and pools[role].active:
                    actions.append(self._remove(pools[role], "idle", time_s))
        return actions, held

    # ---- the log line --------------------------------------------------------------------------
    def _explain(self, obs: Observation, health: dict[Role, _Health], *,
                 forecast: str = "", needs: dict[Role, float] | None = None, held: str = "") -> str:
        front, slo = obs.frontend, self.config.slo
        parts = [forecast] if forecast else [f"rate {front.request_rate:.2f} req/s"]
        if needs is not None:
            parts.append(f"need prefill {needs['prefill']:.2f} decode {needs['decode']:.2f} "
                         f"(x{1 + self.config.headroom:g} headroom)")
        parts.append(f"have prefill {self._have['prefill']} decode {self._have['decode']} "
                     f"(budget {self.config.max_workers})")
        parts.append(f"ttft p90 {_ms(front.ttft_ms_p90)}/{slo.ttft_ms:g} ms, itl p90 {_ms(front.itl_ms_p90)}/"
                     f"{slo.itl_ms:g} ms")
        troubles = [f"{role} {health[role].trouble}" for role in POOLS if health[role].trouble]
        if troubles:
            parts.append("trouble: " + ", ".join(troubles))
        parts.append(f"correction prefill x{self.perf.prefill_correction:.2f} decode x{self.perf.decode_correction:.2f}")
        if held:
            parts.append(held)
        return "; ".join(parts)


def _other(role: Role) -> Role:
    return "decode" if role == "prefill" else "prefill"


def _least_loaded(workers: list[WorkerObservation]) -> WorkerObservation:
    return min(workers, key=lambda w: (w.num_running + w.num_waiting, w.pending_prefill_tokens,
                                       w.kv_used_fraction, w.worker_id))


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"
