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
  `kv_pressure`), each judged only where measured (`health.py`). A pool in trouble is sized at once for the rate seen in the last few calls plus
  its queue drained within `backlog_clear_s` (one worker when that model finds none missing and
  none is on its way); one worker of it may come by a flip from the other pool when that pool has
  slack and more workers than the current rate needs, the rest are added within the budget
  (reason `at_budget` when the budget stops it).

State it owns, in parts: what it has seen of the load (`load.LoadTracker`: the last few calls'
arrivals, the decaying lengths, the window since the last predictive loop, the start-up time it has
seen), its books on the pools (`pools.PoolBook`: the workers it has acted on that have not yet
finished, when each pool last grew), the predictors, and the reactive loop's trouble counts. A
pool's health is a pure function of the observation (`health.py`).

Invariants:
- prefill + decode (+ `both`) workers never exceed `max_workers`; no action takes a pool below
  its minimum, and a pool under its minimum gets a worker first (reason `minimum`).
- A worker in transition (starting, draining, flipping, stopping, or acted on and not yet seen
  finished) counts toward the pool it is becoming and is never picked for another action.
- No removal from, and no flip away from, a pool within `scale_down_cooldown_s` of its growing.
- No data, no decision: a signal that is not measured is neither trouble nor slack. A pool gives a
  worker away only on measured slack (its latency measured and low, or measured idle: reported
  workers with nothing to do and no arrivals counted); an observation whose workers have not
  reported and whose frontend saw nothing moves nothing (minimums aside).

Contract with the adapters: after a decision, the next observation shows an added worker as
`starting`; a worker in state `flipping` reports the role it is becoming (the planner also
remembers the flips it ordered, so a `draining` worker it is flipping counts toward its new role).
Aggregated (`both`) workers count toward the budget only; the planner sizes prefill and decode.
"""

from __future__ import annotations

import math
from collections import deque

from tidal.planner.health import Health, decode_health, prefill_health
from tidal.planner.load import LoadTracker, Window
from tidal.planner.perf_model import PerfModel
from tidal.planner.pools import POOLS, Pool, PoolBook, other_pool
from tidal.planner.predictors import MovingAverage, Predictor, forecast_peak, make_predictor
from tidal.planner.types import Action, Decision, Observation, PlannerConfig, Thresholds
from tidal.protocol import Role


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
        self.load = LoadTracker(self.thresholds, config.worker_startup_s)
        self.book = PoolBook(self.thresholds.pending_timeout_s)
        self._last_predictive_s: float | None = None
        self._have: dict[Role, int] = {"prefill": 0, "decode": 0}
        self._recent_targets: deque[tuple[float, dict[Role, int]]] = deque()
        self._troubled: dict[Role, int] = {"prefill": 0, "decode": 0}  # calls in a row in trouble

    def step(self, obs: Observation) -> Decision:
        self.perf.observe(obs.workers)
        self.load.fold(obs)
        self.book.forget_finished(obs)
        pools, num_both = self.book.count(obs)
        health = {"prefill": prefill_health(obs, pools, self.perf, self.config, self.thresholds),
                  "decode": decode_health(obs, pools, self.perf, self.config, self.thresholds, self.load.lengths)}
        self._have = {role: pools[role].count for role in POOLS}  # for the log line, before any action
        if self._last_predictive_s is None:
            self._last_predictive_s = obs.time_s  # the first window starts now
        if obs.time_s - self._last_predictive_s >= self.config.predictive_interval_s - 1e-9:
            return self._predictive(obs, pools, num_both, health)
        return self._reactive(obs, pools, num_both, health)

    # ---- what it has seen ----------------------------------------------------------------------
    def rate_now(self) -> float:
        """Arrivals per second over the last `recent_calls` observations."""
        return self.load.rate_now()

    @property
    def startup_s(self) -> float:
        """A worker's start-up time: configured, then as seen."""
        return self.load.startup_s

    def lead_s(self) -> float:
        """How far ahead the predictive loop sizes: a worker's start-up plus one interval."""
        return self.load.startup_s + self.config.predictive_interval_s

    # ---- what a pool may give ------------------------------------------------------------------
    def _may_give(self, pool: Pool, health: Health, time_s: float, need_slack: bool) -> bool:
        """Whether `pool` may lose a worker now: above its minimum, one to pick, not grown within the
        cooldown, and idle enough (slack, or at least not in trouble)."""
        cooled = time_s - self.book.last_grew_s[pool.role] >= self.config.scale_down_cooldown_s
        if need_slack:
            calm = health.has_slack(self.thresholds.slack_fraction)
        else:  # not in trouble on what is measured; a pool with nothing measured gives nothing
            calm = health.trouble is None and health.worst_ratio is not None
        return pool.count > self._minimum(pool.role) and bool(pool.active) and cooled and calm

    def _minimum(self, role: Role) -> int:
        return self.config.min_prefill if role == "prefill" else self.config.min_decode

    def _decode_absorbs(self, prefill_need: float, decode_workers: int) -> bool:
        """Whether `decode_workers` can take a prefill need of `prefill_need` workers on themselves
        (local prefill), so that no prefill worker is needed: `min_prefill` 0 and the need at most
        `decode_prefill_share` of them."""
        return (self.config.min_prefill == 0 and self.config.decode_prefill_share > 0
                and prefill_need <= self.config.decode_prefill_share * decode_workers)

    def _can_spare(self, source: Pool, pools: dict[Role, Pool], health: dict[Role, Health], time_s: float) -> bool:
        """Whether `source` may give a worker to the other pool now: it has slack, and what stays
        still serves the rate now, or, for the last prefill worker, the decode workers it joins
        absorb the prefill."""
        if not self._may_give(source, health[source.role], time_s, need_slack=True):
            return False
        need = self._need_now(source.role)
        if source.count - 1 >= math.ceil(need - 1e-9):
            return True
        return source.role == "prefill" and source.count == 1 and self._decode_absorbs(need, pools["decode"].count + 1)

    def _budget_left(self, pools: dict[Role, Pool], num_both: int) -> int:
        return self.config.max_workers - num_both - sum(p.count for p in pools.values())

    # ---- the reactive loop ---------------------------------------------------------------------
    @staticmethod
    def _saw_latencies(obs: Observation, role: Role) -> bool:
        """Whether this call's frontend figures say anything about `role`'s latency target."""
        front = obs.frontend
        return (front.ttft_ms_p90 if role == "prefill" else front.itl_ms_p90) is not None

    def _need_now(self, role: Role) -> float:
        """Workers `role` needs (x (1 + headroom)) for the rate seen now at the latest lengths."""
        rate, (isl, osl, hit) = self.rate_now(), self.load.lengths
        slo = self.config.slo
        if role == "prefill":
            need = self.perf.prefill_workers_needed(rate, isl, hit, slo.ttft_ms)
        else:
            need = self.perf.decode_workers_needed(rate, isl, osl, slo.itl_ms)
        return need * (1 + self.config.headroom)

    def _reactive(self, obs: Observation, pools: dict[Role, Pool], num_both: int,
                  health: dict[Role, Health]) -> Decision:
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
            pool, other = pools[role], pools[other_pool(role)]
            if (want[role] > pool.count and reasons[role] != "minimum" and self.config.allow_flips and not actions
                    and want[other.role] <= other.count and self._can_spare(other, pools, health, obs.time_s)):
                actions.append(self.book.flip(other, pool, reasons[role], obs.time_s))
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
                actions.append(self.book.add(pool, reasons[role], obs.time_s))
                missing -= 1
            if missing > 0:
                held = "at_budget"
        return Decision(obs.time_s, pools["prefill"].count, pools["decode"].count, tuple(actions), "reactive",
                        _explain(obs, health, self.config, self.perf, self._have, held=held), reason=held)

    # ---- the predictive loop -------------------------------------------------------------------
    def _predictive(self, obs: Observation, pools: dict[Role, Pool], num_both: int,
                    health: dict[Role, Health]) -> Decision:
        self._last_predictive_s = obs.time_s
        window = self.load.take_window()
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
                        _explain(obs, health, self.config, self.perf, self._have, forecast=forecast, needs=needs,
                                 held=held), reason=held)

    def _forecast(self, window: Window) -> tuple[float, float, float]:
        """Feed the window to the predictors; forecast the highest rate over the lead time, and ISL
        and OSL one interval ahead."""
        self.rate_predictor.update(window.rate())
        isl, osl = Window.mean(window.isl_weighted), Window.mean(window.osl_weighted)
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

    def _move_toward(self, targets: dict[Role, int], floors: dict[Role, int], pools: dict[Role, Pool],
                     num_both: int, health: dict[Role, Health], time_s: float) -> tuple[list[Action], str]:
        actions: list[Action] = []
        for role in POOLS:  # flips: one pool over its target, the other under
            pool, other = pools[role], pools[other_pool(role)]
            while (self.config.allow_flips and pool.count < targets[role] and other.count > targets[other.role]
                   and self._may_give(other, health[other.role], time_s, need_slack=False)):
                actions.append(self.book.flip(other, pool, "forecast", time_s))
        held = ""
        for role in sorted(POOLS, key=lambda r: pools[r].count - targets[r]):  # adds: the largest deficit first
            while pools[role].count < targets[role]:
                if self._budget_left(pools, num_both) <= 0:
                    held = "at_budget"
                    break
                actions.append(self.book.add(pools[role], "forecast", time_s))
        for role in POOLS:  # removals: an idle pool's whole excess, its least-loaded workers
            if self._may_give(pools[role], health[role], time_s, need_slack=True):
                while pools[role].count > floors[role] and pools[role].active:
                    actions.append(self.book.remove(pools[role], "idle", time_s))
        return actions, held


def _explain(obs: Observation, health: dict[Role, Health], config: PlannerConfig, perf: PerfModel,
             have: dict[Role, int], *, forecast: str = "", needs: dict[Role, float] | None = None, held: str = "") -> str:
    front, slo = obs.frontend, config.slo
    parts = [forecast] if forecast else [f"rate {front.request_rate:.2f} req/s"]
    if needs is not None:
        parts.append(f"need prefill {needs['prefill']:.2f} decode {needs['decode']:.2f} "
                     f"(x{1 + config.headroom:g} headroom)")
    parts.append(f"have prefill {have['prefill']} decode {have['decode']} "
                 f"(budget {config.max_workers})")
    parts.append(f"ttft p90 {_ms(front.ttft_ms_p90)}/{slo.ttft_ms:g} ms, itl p90 {_ms(front.itl_ms_p90)}/"
                 f"{slo.itl_ms:g} ms")
    parts.append("signals (x target) " + "; ".join(f"{role} {health[role].describe()}" for role in POOLS))
    troubles = [f"{role} {health[role].trouble}" for role in POOLS if health[role].trouble]
    if troubles:
        parts.append("trouble: " + ", ".join(troubles))
    parts.append(f"correction prefill x{perf.prefill_correction:.2f} decode x{perf.decode_correction:.2f}")
    if held:
        parts.append(held)
    return "; ".join(parts)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"
