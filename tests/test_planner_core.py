"""The planner's pure core: given hand-built observations, exactly which actions come out.

Every test uses the same step-time model, chosen for round arithmetic:
- prefill: 10,000 tokens/s at any step size (prefill_s(t) = t / 10,000). A step may take half the
  TTFT target of 1000 ms, so a worker runs 5000-token steps and sustains 10,000 tokens/s.
- decode: 10 ms + 1 ms per sequence a step (context length costs nothing). At the ITL target of
  50 ms the largest batch is 40 (10 + 40 = 50 ms), and a step at that batch takes 50 ms.
So at rate R req/s, ISL I, OSL O, prefix hit h:
  prefill workers = ceil(R x I x (1 - h) / 10,000 x 1.15)
  decode workers  = ceil(R x O x 0.05 / 40 x 1.15)  (Little's law: concurrent = R x O x 50 ms)
The reactive loop uses the rate of the last three calls; the predictive loop (every 30 s) the highest
forecast over the lead time: start-up 30 s (configured, no worker seen starting) + 30 s = 2 intervals.
"""

from __future__ import annotations

import importlib.util
import math
import random

import pytest

from tidal.perf.profile import DecodePoint, PrefillPoint, Profile
from tidal.planner.core import Planner
from tidal.planner.perf_model import LinearStepTimes, PerfModel, PerfModelConfig
from tidal.planner.predictors import Arima, Holt, MovingAverage, Seasonal, find_period, forecast_peak, make_predictor
from tidal.planner.types import (SLO, Action, FrontendObservation, Observation, PlannerConfig, Thresholds,
                                 WorkerObservation)


class RoundSteps:
    """prefill 10,000 tokens/s; decode 10 ms + 1 ms per sequence."""

    def prefill_s(self, tokens: float) -> float:
        return tokens / 10_000 if tokens > 0 else 0.0

    def decode_s(self, batch: float, context_len: float) -> float:
        return 0.010 + 0.001 * batch

    def step_s(self, prefill_tokens: float, decode_seqs: float, decode_context_tokens: float) -> float:
        decode = self.decode_s(decode_seqs, 0) if decode_seqs > 0 else 0.0
        return self.prefill_s(prefill_tokens) + decode


def make_planner(correction_alpha: float = 0.3, trouble_calls: int = 1, **overrides) -> Planner:
    """The reactive loop acts on the first call in trouble (the default debounce is two calls; its
    own test says so)."""
    settings = dict(slo=SLO(ttft_ms=1000, itl_ms=50), max_workers=8, min_prefill=1, min_decode=1,
                    reactive_interval_s=2, predictive_interval_s=30, predictor="holt", headroom=0.15,
                    scale_down_cooldown_s=30, allow_flips=True)
    settings.update(overrides)
    perf = PerfModel(RoundSteps(), PerfModelConfig(correction_alpha=correction_alpha))
    return Planner(PlannerConfig(**settings), perf, Thresholds(trouble_calls=trouble_calls))


def prefill(i: int, **fields) -> WorkerObservation:
    """A healthy prefill worker: 10 steps of 2000 tokens (0.2 s each, as the model predicts)."""
    base = dict(steps=10, step_s_mean=0.2, prefill_tokens=20_000)
    return WorkerObservation(f"p{i}", "prefill", **{**base, **fields})


def decode(i: int, **fields) -> WorkerObservation:
    """A healthy decode worker: batch 10, 20 ms steps (10 + 10 x 1 ms, as the model predicts), KV 30%."""
    base = dict(num_running=10, steps=100, step_s_mean=0.02, decode_batch_mean=10.0, context_tokens_mean=2000.0,
                decode_tokens=1000, kv_used_fraction=0.3)
    return WorkerObservation(f"d{i}", "decode", **{**base, **fields})


def front(**fields) -> FrontendObservation:
    """A calm frontend: TTFT P90 300 ms (0.3 of the SLO), ITL P90 20 ms (0.4), ISL 2000, OSL 200."""
    base = dict(request_rate=2.0, ttft_ms_p90=300.0, itl_ms_p90=20.0, isl_mean=2000.0, osl_mean=200.0,
                prefix_hit_rate=0.25)
    return FrontendObservation(**{**base, **fields})


def observe(time_s: float, workers, **frontend) -> Observation:
    return Observation(time_s=time_s, interval_s=2.0, frontend=front(**frontend), workers=tuple(workers))


def start(planner: Planner, workers) -> None:
    """A first call at t=0 that saw nothing (no arrivals over a negligible span): it only starts the
    predictive loop's clock, so the call at t=30 is the first window."""
    decision = planner.step(Observation(time_s=0.0, interval_s=1e-9, frontend=FrontendObservation(),
                                        workers=tuple(workers)))
    assert decision.loop == "reactive" and decision.actions == ()


# ---- the reactive loop ---------------------------------------------------------------------------
def test_ttft_over_flips_the_least_loaded_decode_worker():
    # TTFT P90 1500 > 1000 ms: the prefill pool is in trouble. Decode has slack: ITL P90 20/50 = 0.4,
    # step 20/50 = 0.4, KV 0.3/0.9 = 0.33, all under 0.6; it has 3 workers > min 1. d1 runs fewest.
    planner = make_planner()
    workers = [prefill(0), decode(0), decode(1, num_running=4), decode(2)]
    decision = planner.step(observe(0, workers, ttft_ms_p90=1500.0))
    assert decision.loop == "reactive"
    assert decision.actions == (Action("flip", "prefill", "d1", "ttft_over_slo"),)
    assert (decision.target_prefill, decision.target_decode) == (2, 2)


def test_ttft_over_without_decode_slack_adds_a_prefill_worker():
    # ITL P90 40/50 = 0.8 >= 0.6: decode has no slack to give, so the prefill worker is added (2 of 8 used).
    planner = make_planner()
    decision = planner.step(observe(0, [prefill(0), decode(0), decode(1)], ttft_ms_p90=1500.0, itl_ms_p90=40.0))
    assert decision.actions == (Action("add", "prefill", None, "ttft_over_slo"),)
    assert (decision.target_prefill, decision.target_decode) == (2, 2)


def test_ttft_over_at_budget_does_nothing():
    # 4 prefill + 4 decode = max_workers 8; decode has no slack (ITL 0.8): no action, reason at_budget.
    planner = make_planner()
    workers = [prefill(i) for i in range(4)] + [decode(i) for i in range(4)]
    decision = planner.step(observe(0, workers, ttft_ms_p90=1500.0, itl_ms_p90=40.0))
    assert decision.actions == ()
    assert decision.reason == "at_budget"
    assert "at_budget" in decision.explanation


def test_prefill_queue_counts_as_ttft_trouble():
    # 6000 queued prompt tokens / (1 worker x 10,000 tokens/s) = 0.6 s > half the 1 s TTFT target,
    # though the TTFT P90 (300 ms) is still fine.
    planner = make_planner()
    workers = [prefill(0, pending_prefill_tokens=6000), decode(0), decode(1), decode(2)]
    decision = planner.step(observe(0, workers))
    assert decision.actions == (Action("flip", "prefill", "d0", "prefill_queue"),)


def test_itl_over_flips_a_prefill_worker_with_slack():
    # ITL P90 80 > 50 ms. Prefill has slack (TTFT 0.3, empty queue) and 3 workers > min 1; p2 is least loaded.
    planner = make_planner()
    workers = [prefill(0, num_running=2), prefill(1, num_running=1), prefill(2), decode(0), decode(1)]
    decision = planner.step(observe(0, workers, itl_ms_p90=80.0))
    assert decision.actions == (Action("flip", "decode", "p2", "itl_over_slo"),)
    assert (decision.target_prefill, decision.target_decode) == (2, 3)


def test_decode_step_time_over_itl_adds_a_decode_worker():
    # ITL P90 is fine, but decode steps take 60 ms > 50 ms; prefill is at its minimum (1), so add. The
    # reason names the signal: step time, not the (measured, fine) ITL.
    planner = make_planner()
    workers = [prefill(0), decode(0, step_s_mean=0.06), decode(1, step_s_mean=0.06)]
    decision = planner.step(observe(0, workers))
    assert decision.actions == (Action("add", "decode", None, "step_over_itl"),)
    assert "decode itl 0.40, step 1.20" in decision.explanation


def test_kv_pressure_adds_a_decode_worker():
    # Mean KV use (0.95 + 0.93) / 2 = 0.94 > 0.9, latencies fine; prefill at its minimum: add decode.
    planner = make_planner()
    workers = [prefill(0), decode(0, kv_used_fraction=0.95), decode(1, kv_used_fraction=0.93)]
    decision = planner.step(observe(0, workers))
    assert decision.actions == (Action("add", "decode", None, "kv_pressure"),)


def test_flips_disallowed_adds_instead():
    planner = make_planner(allow_flips=False)
    workers = [prefill(0), decode(0), decode(1), decode(2)]
    decision = planner.step(observe(0, workers, ttft_ms_p90=1500.0))
    assert decision.actions == (Action("add", "prefill", None, "ttft_over_slo"),)


# ---- no data, no decision ------------------------------------------------------------------------
def _quiet(time_s: float, workers) -> Observation:
    """An interval in which no request arrived or finished."""
    return Observation(time_s=time_s, interval_s=2.0, frontend=FrontendObservation(), workers=tuple(workers))


def test_no_observations_no_decision():
    # The planner example's shape (min_prefill 0, budget 3). Both workers are listed but neither has
    # reported its load, and no request arrived or finished: nothing is measured. Over two predictive
    # windows nothing moves (before, every missing ratio read 0: the prefill pool was "idle" and went).
    planner = make_planner(min_prefill=0, max_workers=3, trouble_calls=2)
    workers = [WorkerObservation("p0", "prefill", reported=False), WorkerObservation("d0", "decode", reported=False)]
    for time_s in range(0, 72, 2):
        decision = planner.step(_quiet(time_s, workers))
        assert decision.actions == (), (time_s, decision)
    assert "signals (x target) prefill ttft -, queue -; decode itl -, step -, kv -, queue -" in decision.explanation


def test_measured_idle_still_scales_down():
    # The same fleet, but both workers report nothing running, queued or pending, and the frontend
    # counted zero arrivals: that is data. The first predictive loop (t=30) removes the idle prefill
    # worker (min_prefill 0); the decode worker is at its minimum.
    planner = make_planner(min_prefill=0, max_workers=3, trouble_calls=2)
    workers = [WorkerObservation("p0", "prefill"), WorkerObservation("d0", "decode")]
    decisions = [planner.step(_quiet(time_s, workers)) for time_s in range(0, 32, 2)]
    assert [d.actions for d in decisions[:-1]] == [()] * 15
    assert decisions[-1].loop == "predictive"
    assert decisions[-1].actions == (Action("remove", "prefill", "p0", "idle"),)


def test_partial_observation_decides_only_on_what_is_measured():
    # The example's log line: no request finished (TTFT and ITL "-"), none arrived in the interval, and
    # the decode steps take 150 ms against the 50-ms ITL target. Decode is in trouble on its step time
    # (reason step_over_itl: ITL itself is not measured). The prefill worker is busy (one prompt
    # running) and its TTFT unknown: that is no slack, so it is not flipped (before: flipped, with the
    # reason itl_over_slo); a decode worker is added instead.
    planner = make_planner(min_prefill=0, max_workers=3)
    workers = [prefill(0, num_running=1), decode(0, step_s_mean=0.15)]
    decision = planner.step(observe(0, workers, request_rate=0.0, ttft_ms_p90=None, itl_ms_p90=None,
                                    isl_mean=None, osl_mean=None))
    assert decision.actions == (Action("add", "decode", None, "step_over_itl"),)
    assert "prefill ttft -, queue 0.00; decode itl -, step 3.00" in decision.explanation


def test_a_worker_without_a_report_counts_as_nothing():
    # d0 reports KV use 95% (over 0.9); d1 has not reported yet: its default 0 is no measurement, so the
    # pool's mean is 0.95, not 0.475: KV pressure.
    planner = make_planner()
    workers = [prefill(0), decode(0, kv_used_fraction=0.95), WorkerObservation("d1", "decode", reported=False)]
    decision = planner.step(observe(0, workers))
    assert decision.actions == (Action("add", "decode", None, "kv_pressure"),)


def test_a_pool_with_nothing_measured_gives_nothing_to_a_forecast():
    # The forecast wants 2 prefill workers (rate 10 x ISL 2000 x 0.75 / 10,000 = 1.5 -> 2) and 1 decode
    # (10 x OSL 20 x 0.05 / 40 = 0.25 -> 1); of the 3 decode workers none has reported: no flip from a
    # pool that says nothing (before: d0 flipped). Prefill gets an add.
    planner = make_planner(max_workers=8)
    unreported = [WorkerObservation(f"d{i}", "decode", reported=False) for i in range(3)]
    start(planner, [prefill(0)] + unreported)
    decision = planner.step(observe(30, [prefill(0)] + unreported, request_rate=10.0, osl_mean=20.0, itl_ms_p90=None))
    assert decision.loop == "predictive" and (decision.target_prefill, decision.target_decode) == (2, 1)
    assert decision.actions == (Action("add", "prefill", None, "forecast"),)


# ---- workers in transition -----------------------------------------------------------------------
def test_pool_with_a_starting_worker_waits():
    # ITL over, but a decode worker is already starting: wait for it (it counts: decode = 3).
    planner = make_planner()
    workers = [prefill(0), decode(0), decode(1), WorkerObservation("d2", "decode", state="starting")]
    decision = planner.step(observe(0, workers, itl_ms_p90=80.0))
    assert decision.actions == ()
    assert decision.target_decode == 3


def test_workers_in_transition_are_not_picked():
    # TTFT over; decode has slack. d0 is idle but draining (leaving), d1 stopping, d2 flipping to decode
    # (counts as incoming decode): of the active d3 (8 running) and d4 (10), the flip takes d3.
    planner = make_planner()
    workers = [prefill(0), decode(0, state="draining", num_running=0), decode(1, state="stopping", num_running=0),
               decode(2, state="flipping", num_running=0), decode(3, num_running=8), decode(4)]
    decision = planner.step(observe(0, workers, ttft_ms_p90=1500.0))
    assert decision.actions == (Action("flip", "prefill", "d3", "ttft_over_slo"),)
    # d0 and d1 are leaving: decode counts d2 (flipping into it) and d4.
    assert (decision.target_prefill, decision.target_decode) == (2, 2)


def test_a_flipped_worker_blocks_repeated_actions_until_it_lands():
    # t=0: TTFT over -> flip d0 to prefill. t=2: the actuator has not started, d0 still reports active
    # decode and TTFT is still over: d0 counts as incoming prefill, so nothing more happens.
    planner = make_planner()
    workers = [prefill(0), decode(0, num_running=1), decode(1), decode(2)]
    first = planner.step(observe(0, workers, ttft_ms_p90=1500.0))
    assert first.actions == (Action("flip", "prefill", "d0", "ttft_over_slo"),)
    second = planner.step(observe(2, workers, ttft_ms_p90=1500.0))
    assert second.actions == ()
    assert (second.target_prefill, second.target_decode) == (2, 2)
    # t=4: d0 is a prefill worker now; TTFT still over, decode still has slack: the next flip goes.
    landed = [prefill(0), WorkerObservation("d0", "prefill"), decode(1), decode(2, num_running=3)]
    third = planner.step(observe(4, landed, ttft_ms_p90=1500.0))
    assert third.actions == (Action("flip", "prefill", "d2", "ttft_over_slo"),)


def test_cooldown_blocks_flipping_away_from_a_pool_that_just_grew():
    # t=0: ITL over -> flip p1 into decode. t=2: TTFT over; decode has slack but grew 2 s ago (< 30 s
    # cooldown), so no flip back: a prefill worker is added instead.
    planner = make_planner()
    first = planner.step(observe(0, [prefill(0, num_running=2), prefill(1), decode(0)], itl_ms_p90=80.0))
    assert first.actions == (Action("flip", "decode", "p1", "itl_over_slo"),)
    workers = [prefill(0), WorkerObservation("p1", "decode"), decode(0)]
    second = planner.step(observe(2, workers, ttft_ms_p90=1500.0))
    assert second.actions == (Action("add", "prefill", None, "ttft_over_slo"),)


# ---- minimums and the budget ---------------------------------------------------------------------
def test_pool_under_its_minimum_gets_a_worker_first():
    # min_decode 2, one decode worker (the other died): add one, reason minimum.
    planner = make_planner(min_decode=2)
    decision = planner.step(observe(0, [prefill(0), decode(0)]))
    assert decision.actions == (Action("add", "decode", None, "minimum"),)


def test_minimums_are_held_when_idle():
    # No load at all: targets are the minimums (1 prefill, 2 decode), which is what runs: nothing removed.
    planner = make_planner(min_decode=2)
    workers = [prefill(0), decode(0, num_running=0), decode(1, num_running=0)]
    planner.step(observe(0, workers, request_rate=0.0))
    decision = planner.step(observe(30, workers, request_rate=0.0))
    assert decision.loop == "predictive"
    assert (decision.target_prefill, decision.target_decode) == (1, 2)
    assert decision.actions == ()


def test_minimums_beyond_the_budget_are_refused():
    with pytest.raises(ValueError, match="exceed max_workers"):
        make_planner(min_prefill=4, min_decode=5)


# ---- the predictive loop -------------------------------------------------------------------------
def test_forecast_sizes_both_pools_and_adds():
    # rate 10 req/s x ISL 2000 x (1 - 0.25) = 15,000 tok/s / 10,000 per worker = 1.5 -> ceil(1.5 x 1.15 = 1.725) = 2
    # concurrent = 10 x 200 x 0.05 s = 100 sequences / 40 per worker = 2.5 -> ceil(2.875) = 3
    # have 1 and 1: decode (short by 2) is served first, then prefill.
    planner = make_planner()
    workers = [prefill(0), decode(0)]
    start(planner, workers)
    decision = planner.step(observe(30, workers, request_rate=10.0))
    assert decision.loop == "predictive"
    assert (decision.target_prefill, decision.target_decode) == (2, 3)
    assert decision.actions == (Action("add", "decode", None, "forecast"), Action("add", "decode", None, "forecast"),
                                Action("add", "prefill", None, "forecast"))
    assert "rate 10.00 req/s -> 10.00 req/s" in decision.explanation


def test_forecast_flips_before_adding():
    # Same load: targets 2 prefill, 3 decode. Running 4 prefill (2 over) and 1 decode (2 under):
    # two flips, the least-loaded prefill workers p3 then p2; nothing added.
    planner = make_planner()
    workers = [prefill(0, num_running=3), prefill(1, num_running=2), prefill(2, num_running=1), prefill(3), decode(0)]
    start(planner, workers)
    decision = planner.step(observe(30, workers, request_rate=10.0))
    assert decision.actions == (Action("flip", "decode", "p3", "forecast"), Action("flip", "decode", "p2", "forecast"))


def test_forecast_targets_are_cut_to_the_budget():
    # rate 40: prefill 40 x 1500 / 10,000 = 6 -> ceil(6.9) = 7; decode 40 x 200 x 0.05 / 40 = 10 -> ceil(11.5) = 12.
    # 19 > 8: the larger target above its minimum gives first until 8: prefill 4, decode 4.
    planner = make_planner()
    workers = [prefill(i) for i in range(4)] + [decode(i) for i in range(4)]
    start(planner, workers)
    decision = planner.step(observe(30, workers, request_rate=40.0))
    assert (decision.target_prefill, decision.target_decode) == (4, 4)
    assert decision.actions == ()
    assert decision.reason == "at_budget"


def test_holt_forecasts_a_rising_rate_higher_than_the_moving_average():
    # Predictive loops at t=30, 60, 90 see rates 4, 6, 8 req/s (ISL 4000, hit 0.25: 3000 new tokens each).
    # Holt: 4 (level 4), 6 (level 6, trend 2), 8: level 0.5 x 8 + 0.5 x (6 + 2) = 8, trend 0.3 x 2 + 0.7 x 2 = 2
    #   -> one interval ahead 10, two (the lead) 12: prefill 12 x 3000 / 10,000 = 3.6 -> ceil(4.14) = 5;
    #   decode 12 x 200 x 0.05 / 40 = 3 -> ceil(3.45) = 4
    # Moving average: (4 + 6 + 8) / 3 = 6 at any horizon (and the last three calls' rate is 6 too):
    #   prefill 1.8 -> ceil(2.07) = 3; decode 1.5 -> ceil(1.725) = 2
    expected = {"holt": (10.0, 5, 4), "moving_average": (6.0, 3, 2)}
    for name, (rate, target_prefill, target_decode) in expected.items():
        planner = make_planner(predictor=name, max_workers=16)
        workers = [prefill(0), decode(0)]
        start(planner, workers)
        for time_s, observed_rate in ((30, 4.0), (60, 6.0), (90, 8.0)):
            decision = planner.step(observe(time_s, workers, request_rate=observed_rate, isl_mean=4000.0))
        assert planner.rate_predictor.forecast(1) == pytest.approx(rate)
        assert (decision.target_prefill, decision.target_decode) == (target_prefill, target_decode), name


def test_scale_down_waits_for_the_cooldown_and_removes_the_least_loaded():
    # cooldown 60 s. t=0: ITL over, prefill at its minimum -> add decode (decode grew at t=0).
    # rate 2: prefill 2 x 1500 / 10,000 = 0.3 -> 1; decode 2 x 200 x 0.05 / 40 = 0.5 -> 1: decode is 3 over.
    # t=30: 30 s since decode grew < 60: no removal. t=60: the whole excess goes, least loaded first:
    # d2 (1 running), d1 (2), d0 (3); d3 (4) stays.
    planner = make_planner(scale_down_cooldown_s=60)
    first = planner.step(observe(0, [prefill(0), decode(0), decode(1), decode(2)], itl_ms_p90=80.0))
    assert first.actions == (Action("add", "decode", None, "itl_over_slo"),)
    workers = [prefill(0), decode(0, num_running=3), decode(1, num_running=2), decode(2, num_running=1),
               decode(3, num_running=4)]
    early = planner.step(observe(30, workers))
    assert early.loop == "predictive" and early.actions == ()
    assert (early.target_prefill, early.target_decode) == (1, 1)
    decision = planner.step(observe(60, workers))
    assert decision.actions == (Action("remove", "decode", "d2", "idle"), Action("remove", "decode", "d1", "idle"),
                                Action("remove", "decode", "d0", "idle"))


def test_no_removal_from_a_busy_pool():
    # Forecast says 1 decode worker, but ITL P90 is 40/50 = 0.8 (no slack): keep them all.
    planner = make_planner()
    workers = [prefill(0), decode(0), decode(1)]
    planner.step(observe(0, workers, itl_ms_p90=40.0))
    decision = planner.step(observe(30, workers, itl_ms_p90=40.0))
    assert decision.target_decode == 1
    assert decision.actions == ()


def test_online_correction_raises_needs_when_steps_run_slow():
    # Decode steps at batch 10 take 40 ms, the model says 10 + 10 = 20 ms: ratio 2 (EWMA alpha 1 -> x2).
    # Corrected: 2 x (10 + B) ms <= 50 -> B = 15, a step 2 x 25 = 50 ms; rate 10: 10 x 200 x 0.05 = 100
    # concurrent / 15 = 6.67 -> ceil(7.67) = 8 decode workers (3 uncorrected).
    planner = make_planner(correction_alpha=1.0, max_workers=16)
    workers = [prefill(0), decode(0, step_s_mean=0.04), decode(1, step_s_mean=0.04)]
    planner.step(observe(0, workers, request_rate=10.0))
    decision = planner.step(observe(30, workers, request_rate=10.0))
    assert planner.perf.decode_correction == pytest.approx(2.0)
    assert planner.perf.prefill_correction == pytest.approx(1.0)  # 0.2 s for 2000 tokens, as predicted
    assert (decision.target_prefill, decision.target_decode) == (2, 8)


def test_correction_is_smoothed_and_clamped():
    perf = PerfModel(RoundSteps(), PerfModelConfig(correction_alpha=0.5))
    slow = [decode(0, step_s_mean=0.1)]  # 100 ms observed / 20 ms predicted = 5
    perf.observe(slow)
    assert perf.decode_correction == pytest.approx(3.0)  # 0.5 x 1 + 0.5 x 5 = 3.0, the ceiling
    perf.observe(slow)
    assert perf.decode_correction == pytest.approx(3.0)  # 0.5 x 3 + 0.5 x 5 = 4 -> clamped to 3
    perf.observe([decode(0, step_s_mean=0.01)])  # ratio 0.5: 0.5 x 3 + 0.5 x 0.5 = 1.75
    assert perf.decode_correction == pytest.approx(1.75)
    perf.observe([decode(0, state="starting", step_s_mean=1.0)])  # not active: ignored
    assert perf.decode_correction == pytest.approx(1.75)


# ---- the performance model -----------------------------------------------------------------------
def test_default_perf_model_figures():
    # LinearStepTimes: 8 ms + t / 20,000 s. Half of 1000 ms: t <= (0.5 - 0.008) x 20,000 = 9840 tokens,
    # 9840 / 0.5 s = 19,680 tokens/s.
    perf = PerfModel.default()
    assert perf.prefill_step_tokens(1000) == 9840
    assert perf.prefill_tokens_per_s(1000) == pytest.approx(19_680)
    # Decode at context 2100: 8 ms + B x (0.05 ms + 2100 x 8 ns) = 8 + 0.0668 B ms <= 50 -> 628, capped at 256.
    assert perf.decode_batch(50, 2100) == 256
    assert perf.decode_batch(20, 2100) == 179  # (20 - 8) / 0.0668 = 179.6


def test_perf_model_from_profile():
    # Prefill: 1024 tokens in 0.1 s (10,240 tok/s), 2048 in 0.15 s (13,653), 4096 in 0.3 s (13,653):
    # the knee (90% of the best) is 2048 tokens, so a worker sustains 13,653 tokens/s.
    # Decode: 20 ms at batch 1, 40 ms at batch 64 (context 1024): ITL 30 ms fits batch 1 + 63 x 10/20 = 32.
    profile = Profile(model="m", device="cpu", device_name="cpu", dtype="bfloat16", block_size=16,
                      num_kv_blocks=1000, created="2026-01-01T00:00:00Z", tidal_version="0",
                      prefill=(PrefillPoint(1024, 0.1), PrefillPoint(2048, 0.15), PrefillPoint(4096, 0.3)),
                      decode=(DecodePoint(1, 1024, 0.02), DecodePoint(64, 1024, 0.04)))
    perf = PerfModel.from_profile(profile)
    assert perf.prefill_step_tokens(1000) == 2048
    assert perf.prefill_tokens_per_s(1000) == pytest.approx(2048 / 0.15)
    assert perf.decode_batch(30, 1024) == 32
    assert perf.decode_batch(100, 1024) == 64  # never beyond the largest measured batch


# ---- predictors ----------------------------------------------------------------------------------
def test_moving_average():
    average = MovingAverage(window=3)
    assert average.forecast(1) == 0.0
    for value in (1, 2, 3, 10):
        average.update(value)
    assert average.forecast(1) == pytest.approx(5.0)  # (2 + 3 + 10) / 3
    assert average.forecast(5) == pytest.approx(5.0)


def test_holt_follows_a_trend_and_never_goes_negative():
    holt = Holt(alpha=0.5, beta=0.3)
    for value in (10, 12, 14):  # an exact ramp: level 14, trend 2
        holt.update(value)
    assert holt.forecast(1) == pytest.approx(16.0)
    assert holt.forecast(3) == pytest.approx(20.0)
    holt.update(10)  # level 0.5 x 10 + 0.5 x 16 = 13, trend 0.3 x (13 - 14) + 0.7 x 2 = 1.1
    assert (holt.level, holt.trend) == (pytest.approx(13.0), pytest.approx(1.1))
    falling = Holt()
    for value in (10, 4):  # trend -6
        falling.update(value)
    assert falling.forecast(2) == 0.0  # 4 - 12, floored


def test_make_predictor_and_arima():
    assert isinstance(make_predictor("holt"), Holt)
    assert isinstance(make_predictor("moving_average"), MovingAverage)
    with pytest.raises(ValueError, match="unknown predictor"):
        make_predictor("prophet")
    if importlib.util.find_spec("statsmodels") is None:
        with pytest.raises(ImportError, match="needs statsmodels"):
            Arima()
        return
    arima = Arima(order=(1, 1, 0))
    for i in range(20):
        arima.update(10 + i)
    assert arima.forecast(1) == pytest.approx(30, rel=0.1)


def test_find_period_of_a_square_wave():
    # 14 steps at 10, 6 at 40, repeated: period 20. Two periods are needed (lags up to n/2).
    wave = [40.0 if i % 20 >= 14 else 10.0 for i in range(60)]
    assert find_period(wave) == 20
    assert find_period(wave[:30]) is None  # 30 values: lags up to 15 < 20, nothing repeats yet
    assert find_period([25.0] * 60) is None  # flat: no variation
    rng = random.Random(1)
    assert find_period([rng.uniform(0, 50) for _ in range(200)]) is None  # noise: no lag correlates


def test_seasonal_forecasts_by_phase_and_falls_back_to_holt():
    seasonal = Seasonal()
    for value in (10, 12, 14):  # no period yet: Holt (an exact ramp: 16 next)
        seasonal.update(value)
    assert seasonal.period is None and seasonal.forecast(1) == pytest.approx(16.0)
    seasonal = Seasonal()
    wave = [40.0 if i % 20 >= 14 else 10.0 for i in range(60)]  # the last value is index 59 (phase 19)
    for value in wave:
        seasonal.update(value)
    assert seasonal.period == 20
    assert seasonal.forecast(1) == 10.0  # index 60: phase 0 (calm), seen at 40, 20, 0
    assert seasonal.forecast(15) == 40.0  # index 74: phase 14 (burst), seen at 54, 34, 14
    # what the planner sizes for: the highest forecast over the next steps
    assert forecast_peak(seasonal, 14) == 10.0 and forecast_peak(seasonal, 15) == 40.0
    assert isinstance(make_predictor("seasonal"), Seasonal)


# ---- whole-gap growth, the decode queue, KV capacity, start-up ----------------------------------
def test_reactive_grows_a_pool_by_its_whole_gap():
    # rate 20 req/s (the only call so far): prefill 20 x 1500 / 10,000 = 3 -> x 1.15 = 3.45, TTFT over:
    # ceil(3.45) = 4, have 1 -> add 3. Decode: 20 x 200 x 0.05 / 40 = 5 <= 6 running, ITL 40/50 (no slack
    # to give, not in trouble): untouched.
    planner = make_planner(max_workers=16)
    workers = [prefill(0)] + [decode(i) for i in range(6)]
    decision = planner.step(observe(0, workers, request_rate=20.0, ttft_ms_p90=1500.0, itl_ms_p90=40.0))
    assert decision.actions == (Action("add", "prefill", None, "ttft_over_slo"),) * 3


def test_reactive_over_capacity_and_the_budget_cut():
    # rate 20: prefill needs 3.45 (TTFT over: want 4), decode 5 x 1.15 = 5.75 > 2 running (utilisation
    # over 1: over_capacity, want 6). 10 > budget 6: cut the pool furthest over its need for the rate now,
    # want / need: prefill 4/3.45 = 1.16 > decode 6/5.75 = 1.04 -> prefill 3; then 0.87 vs 1.04 -> decode 5;
    # 0.87 vs 0.87 (a tie: prefill first) -> prefill 2; 0.58 vs 0.87 -> decode 4. Sum 6: add 1 prefill, 2 decode.
    planner = make_planner(max_workers=6)
    decision = planner.step(observe(0, [prefill(0), decode(0), decode(1)], request_rate=20.0, ttft_ms_p90=1500.0,
                                    itl_ms_p90=40.0))
    assert decision.actions == (Action("add", "prefill", None, "ttft_over_slo"),
                                Action("add", "decode", None, "over_capacity"),
                                Action("add", "decode", None, "over_capacity"))
    assert decision.reason == "at_budget"


def test_a_flip_needs_no_budget():
    # 2 prefill + 2 decode = max_workers 4. ITL P90 80 > 50: decode in trouble. Rate 2: decode needs
    # 2 x 200 x 0.05 / 40 = 0.5 -> x 1.15 -> 1 <= 2 running: trouble the model does not explain, so it
    # wants one more, and the budget is spent. The flip comes before the budget cut: prefill needs
    # 2 x 1500 / 10,000 = 0.3 -> 0.345 -> 1 <= the 1 left, with slack: p1 (least loaded) becomes decode.
    planner = make_planner(max_workers=4)
    workers = [prefill(0, num_running=2), prefill(1), decode(0), decode(1)]
    decision = planner.step(observe(0, workers, itl_ms_p90=80.0))
    assert decision.actions == (Action("flip", "decode", "p1", "itl_over_slo"),)
    assert decision.reason == ""


def test_the_last_prefill_worker_flips_when_decode_absorbs_its_prefill():
    # 1 prefill + 1 decode = max_workers 2, min_prefill 0. ITL P90 80 > 50: decode wants 2. Prefill
    # needs 0.345 workers (above) > 0 left, but 0.345 <= decode_prefill_share 0.25 x 2 decode workers
    # = 0.5: the decode workers prefill locally, so p0 flips.
    planner = make_planner(max_workers=2, min_prefill=0)
    decision = planner.step(observe(0, [prefill(0), decode(0)], itl_ms_p90=80.0))
    assert decision.actions == (Action("flip", "decode", "p0", "itl_over_slo"),)
    # A share of 0 keeps it: nothing to add within the budget.
    planner = make_planner(max_workers=2, min_prefill=0, decode_prefill_share=0.0)
    decision = planner.step(observe(0, [prefill(0), decode(0)], itl_ms_p90=80.0))
    assert decision.actions == () and decision.reason == "at_budget"
    # Rate 4: prefill needs 4 x 1500 / 10,000 x 1.15 = 0.69 > 0.5: too much to absorb; kept.
    planner = make_planner(max_workers=2, min_prefill=0)
    decision = planner.step(observe(0, [prefill(0), decode(0)], itl_ms_p90=80.0, request_rate=4.0))
    assert decision.actions == ()


def test_forecast_short_of_budget_gives_absorbable_prefill_to_decode():
    # min_prefill 0, budget 2. Rate 2, ISL 2000, no prefix hits, OSL 900: prefill 2 x 2000 / 10,000 = 0.4
    # -> x 1.15 = 0.46 -> 1; decode 2 x 900 x 0.05 / 40 = 2.25 -> 2.59 -> 3. 4 > 2, and 0.46 <= 0.25 x 2
    # = 0.5: the decode workers absorb the prefill, targets 0 and 2, and p0 flips to decode.
    planner = make_planner(max_workers=2, min_prefill=0)
    workers = [prefill(0), decode(0)]
    start(planner, workers)
    decision = planner.step(observe(30, workers, request_rate=2.0, prefix_hit_rate=0.0, osl_mean=900.0))
    assert (decision.target_prefill, decision.target_decode) == (0, 2)
    assert decision.actions == (Action("flip", "decode", "p0", "forecast"),)
    # Budget 3, rate 8, hit 0.25, OSL 200: prefill 8 x 1500 / 10,000 = 1.2 -> 1.38 -> 2; decode 8 x 200
    # x 0.05 / 40 = 2 -> 2.3 -> 3. 5 > 3, but 1.38 > 0.25 x 3 = 0.75: the usual cut (the larger target
    # above its minimum first, decode on a tie): decode 2, then prefill 1.
    planner = make_planner(max_workers=3, min_prefill=0)
    workers = [prefill(0), decode(0), decode(1)]
    start(planner, workers)
    decision = planner.step(observe(30, workers, request_rate=8.0))
    assert (decision.target_prefill, decision.target_decode) == (1, 2)
    assert decision.actions == ()


def test_reactive_waits_for_trouble_to_last_two_calls_by_default():
    # The default debounce: TTFT over at t=0 is noted, not acted on; over again at t=2: a worker comes.
    planner = make_planner(trouble_calls=2)
    workers = [prefill(0), decode(0), decode(1, num_running=4), decode(2)]
    assert planner.step(observe(0, workers, ttft_ms_p90=1500.0)).actions == ()
    assert planner.step(observe(2, workers, ttft_ms_p90=1500.0)).actions == (
        Action("flip", "prefill", "d1", "ttft_over_slo"),)
    # Calm in between restarts the count.
    assert planner.step(observe(4, workers)).actions == ()
    assert planner.step(observe(6, workers, ttft_ms_p90=1500.0, request_rate=2.0)).actions == ()
    # A call with no finished request (no TTFT figure) neither counts nor clears: t=6 and t=10 are two in a row.
    planner = make_planner(trouble_calls=2)
    assert planner.step(observe(6, workers, ttft_ms_p90=1500.0)).actions == ()
    assert planner.step(observe(8, workers, ttft_ms_p90=None)).actions == ()
    assert planner.step(observe(10, workers, ttft_ms_p90=1500.0)).actions == (
        Action("flip", "prefill", "d1", "ttft_over_slo"),)


def test_requests_waiting_for_a_decode_slot_are_decode_trouble():
    # 12 requests wait on the decode workers; a worker's batch is 40: 12 / 40 = 0.3 > 0.25 of a batch.
    # The model needs 0.575 + 0.3 backlog -> ceil = 1 <= 2 running, none on its way: one more. Prefill is
    # at its minimum, so it is added.
    planner = make_planner()
    decision = planner.step(observe(0, [prefill(0), decode(0, num_waiting=6), decode(1, num_waiting=6)]))
    assert decision.actions == (Action("add", "decode", None, "decode_queue"),)


def test_kv_capacity_caps_the_decode_batch():
    # A decode worker reports 44,000 KV tokens: at ISL 2000 + OSL 200 = 2200 tokens a sequence, 20 fit
    # (under the 40 the ITL target allows). At 10 req/s: 10 x 200 x 30 ms (step at batch 20) = 60 / 20 = 3.
    perf = PerfModel(RoundSteps())
    assert perf.decode_workers_needed(10, 2000, 200, 50) == pytest.approx(2.5)  # batch 40, 50-ms steps
    perf.observe([decode(0, kv_capacity_tokens=44_000)])
    assert perf.decode_batch(50, 2100, 2200) == 20
    assert perf.decode_workers_needed(10, 2000, 200, 50) == pytest.approx(3.0)


def test_startup_time_is_learnt_and_sets_the_lead():
    # Configured 30 s. n0 is first seen starting at t=2 (ordered one interval before: t=0) and active
    # at t=12: 12 s. EWMA 0.5 x 30 + 0.5 x 12 = 21; the lead is that + the 30-s predictive interval.
    planner = make_planner(max_workers=16)
    base = [prefill(0), decode(0)]
    planner.step(observe(2, base + [WorkerObservation("n0", "decode", state="starting")]))
    planner.step(observe(12, base + [WorkerObservation("n0", "decode")]))
    assert planner.startup_s == pytest.approx(21.0)
    assert planner.lead_s() == pytest.approx(51.0)


def test_without_a_period_scale_down_waits_for_the_window():
    # Holt (no period): a cut goes no lower than the largest predictive target of the last 60 s.
    # t=30: rate 10 -> prefill 1.5 -> 2, decode 10 x 200 x 0.05 / 40 = 2.5 -> 3: the least-loaded decode
    # worker d0 flips to prefill, and of the 4 decode left the least loaded, d1, goes.
    # t=32..58: rate 2, nothing in trouble. t=60: window rate 2, Holt 10 -> 2 forecasts 0, the last five
    # calls' rate is 2 -> prefill 1, decode 0.5 -> 1; but 2 and 3 were the targets 30 s ago: all stay.
    planner = make_planner(max_workers=16, scale_down_cooldown_s=0)
    workers = [prefill(0)] + [decode(i, num_running=i) for i in range(5)]
    start(planner, workers)
    first = planner.step(observe(30, workers, request_rate=10.0))
    assert first.target_decode == 3
    assert first.actions == (Action("flip", "prefill", "d0", "forecast"), Action("remove", "decode", "d1", "idle"))
    left = workers[:1] + [WorkerObservation("d0", "prefill")] + workers[3:]
    for time_s in range(32, 60, 2):
        assert planner.step(observe(time_s, left, request_rate=2.0)).actions == ()
    second = planner.step(observe(60, left, request_rate=2.0))
    assert second.loop == "predictive" and (second.target_prefill, second.target_decode) == (1, 1)
    assert second.actions == ()


# ---- invariants over a random run ----------------------------------------------------------------
def test_random_run_keeps_budget_minimums_and_transitions():
    """A fleet that applies every decision (adds start, then become active; flips drain, then land;
    removals drain, then leave) under random load: the budget and minimums always hold, and no
    action picks a worker that is not active."""
    rng = random.Random(7)
    config = dict(max_workers=6, min_prefill=1, min_decode=2, predictive_interval_s=10)
    planner = make_planner(**config)
    fleet = {"p0": ("prefill", "active"), "d0": ("decode", "active"), "d1": ("decode", "active")}
    next_id = 0
    kinds = set()
    for tick in range(300):
        burst = (tick // 60) % 2 == 1
        slowest_step_s = 0.08 if burst else 0.04  # decode steps track the load: over the 50-ms ITL only in bursts
        workers = [WorkerObservation(wid, role, state=state, num_running=rng.randint(0, 20), steps=50,
                                     step_s_mean=rng.uniform(0.01, slowest_step_s) if role == "decode" else 0.2,
                                     prefill_tokens=20_000 if role == "prefill" else 0,
                                     decode_batch_mean=10.0 if role == "decode" else 0.0,
                                     kv_used_fraction=rng.uniform(0, 0.95))
                   for wid, (role, state) in sorted(fleet.items())]
        if burst:  # bursts (120 s): heavy, often over the SLOs
            load = dict(request_rate=rng.uniform(10, 30), ttft_ms_p90=rng.uniform(100, 2000),
                        itl_ms_p90=rng.uniform(5, 90))
        else:  # calm (120 s, longer than the 60-s scale-down window): light and well inside them
            load = dict(request_rate=rng.uniform(0, 2), ttft_ms_p90=rng.uniform(50, 300), itl_ms_p90=rng.uniform(5, 20))
        obs = observe(2.0 * tick, workers, **load)
        decision = planner.step(obs)
        # advance transitions: each lasts one tick
        for wid, (role, state) in list(fleet.items()):
            if state == "starting" or state == "flipping":
                fleet[wid] = (role, "active")
            elif state == "stopping":
                del fleet[wid]
        for action in decision.actions:
            if action.kind == "add":
                fleet[f"n{next_id}"] = (action.role, "starting")
                next_id += 1
                continue
            assert fleet[action.worker_id][1] == "active", action
            kinds.add(action.kind)
            fleet[action.worker_id] = ((action.role, "flipping") if action.kind == "flip"
                                       else (fleet[action.worker_id][0], "stopping"))
        assert len(fleet) <= config["max_workers"]
        assert decision.target_prefill + decision.target_decode <= config["max_workers"]
        counts = {role: sum(1 for r, s in fleet.values() if r == role and s != "stopping")
                  for role in ("prefill", "decode")}
        assert counts["prefill"] >= config["min_prefill"] and counts["decode"] >= config["min_decode"]
    assert next_id > 0 and kinds == {"flip", "remove"}  # the run scaled up, moved and scaled down
    assert math.isfinite(planner.perf.decode_correction)


def test_linear_step_times_shape():
    steps = LinearStepTimes(base_s=0.01, prefill_s_per_token=0.001, decode_s_per_seq=0.002, decode_s_per_kv_token=0.0)
    assert steps.prefill_s(0) == 0.0
    assert steps.prefill_s(10) == pytest.approx(0.02)
    assert steps.decode_s(5, 100) == pytest.approx(0.02)
    assert steps.step_s(10, 5, 500) == pytest.approx(0.03)
