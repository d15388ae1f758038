"""Experiments on the fleet simulator: the planner in the loop against static prefill:decode splits.

One experiment = one workload (`square`, `trace` or `poisson`) on a fleet of at most `max_workers`
workers, played by several arms:

- `planner`: starts at the split the calm (or mean) rate needs and lets `tidal.planner.core.Planner`
  add, remove and flip workers every `interval_s`;
- `static P:D` splits. `peak` is the split sized for the burst (or, on a trace, the peak 10-s) rate at
  `utilisation` — on the square wave that is the whole budget; `best static` is the static split with
  the fewest worker-seconds that still reaches `attainment_goal` over the whole run (or the best
  attainment when none does), found by a bisection on the total per P share.

Each arm reports SLO attainment overall and through the bursts (requests that arrive in a burst:
the square wave's burst phase; on a trace, the busiest quarter of 10-s windows), worker-seconds and
their ratio to `peak`'s, TTFT p90, ITL p90 (every inter-token gap) and the p90 of requests' mean
ITL, dropped requests and the planner's adds/removes/flips. `series` gives per-window load,
latency and pool sizes for the plots.

Nothing here is timed on the wall clock: every figure is simulated time.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

from tidal.planner.types import SLO, PlannerConfig
from tidal.planner.types import percentile
from tidal.sim.fleet import Fleet
from tidal.sim.fleet_config import FleetConfig
from tidal.sim.fleet_metrics import FleetResult, weighted_percentile
from tidal.sim.fleet_worker import SimRequest
from tidal.sim.fleet_workloads import (DEFAULT_TRACE, Lengths, in_burst, poisson, shape_of, square_wave,
                                       trace_workload, worker_rates)
from tidal.sim.timing import StepTimeModel

WINDOW_S = 10.0


@dataclass(frozen=True)
class ExperimentConfig:
    workload: str = "square"
    """square | trace | poisson"""
    max_workers: int = 64
    duration_s: float = 600.0
    ttft_ms: float = 1000.0
    itl_ms: float = 50.0
    calm_s: float = 140.0
    burst_s: float = 60.0
    """Square wave: each period is calm_s at 0.5 x the reference rate, then burst_s at 2 x."""
    utilisation: float = 0.8
    """Pools are sized (reference capacity, peak and calm splits) to run at this share of their rate."""
    trace: str = str(DEFAULT_TRACE)
    trace_load: float = 0.5
    """Trace: mean rate as a share of the whole budget's capacity at the trace's mean lengths."""
    lengths: Lengths = field(default_factory=Lengths)
    interval_s: float = 2.0
    predictive_interval_s: float = 10.0
    learn_periods: int = 2
    """Square wave: bursts in the first `learn_periods` periods are reported apart as well (the
    planner's seasonal predictor finds the period once it has seen two)."""
    startup_s: float | None = None
    """The planner's configured worker start-up (None: the fleet's)."""
    attainment_goal: float = 0.95
    seed: int = 0


@dataclass
class Workload:
    requests: list[SimRequest]
    is_burst: Callable[[float], bool]
    learnt_from_s: float | None  # square wave: where the bursts after the learning periods start
    calm_split: tuple[int, int]
    peak_split: tuple[int, int]
    prefill_share: float
    description: str


def reference_rate(config: ExperimentConfig, rates) -> float:
    """The square wave's 1x: what half the budget carries at `utilisation` (so the 2x burst needs the
    whole budget at that utilisation, and the 0.5x calm a quarter of it)."""
    return rates.fleet_rps(config.max_workers / 2) * config.utilisation


def build_workload(config: ExperimentConfig, model: StepTimeModel, fleet: FleetConfig) -> Workload:
    if config.workload == "trace":
        return _trace(config, model, fleet)
    lengths = config.lengths
    rates = worker_rates(model, fleet, lengths.isl_mean, lengths.osl_mean, lengths.isl_mean * lengths.prefix_hit,
                         config.itl_ms)
    base = reference_rate(config, rates)
    share = (1 / rates.prefill_rps) / (1 / rates.prefill_rps + 1 / rates.decode_rps)
    if config.workload == "square":
        period = config.calm_s + config.burst_s
        periods = max(1, round(config.duration_s / period))
        requests = square_wave(0.5 * base, 2 * base, config.calm_s, config.burst_s, periods, lengths, config.seed)
        return Workload(requests, lambda t: in_burst(t, config.calm_s, config.burst_s),
                        config.learn_periods * period if periods > config.learn_periods else None,
                        _fit(rates.split(0.5 * base, config.utilisation), config.max_workers),
                        _fit(rates.split(2 * base, config.utilisation), config.max_workers), share,
                        f"square wave: {periods} x ({config.calm_s:g} s at {0.5 * base:.1f} req/s, "
                        f"{config.burst_s:g} s at {2 * base:.1f} req/s)")
    if config.workload == "poisson":
        requests = poisson(base, config.duration_s, lengths, config.seed)
        split = _fit(rates.split(base, config.utilisation), config.max_workers)
        return Workload(requests, lambda t: True, None, split, split, share, f"Poisson at {base:.1f} req/s")
    raise ValueError(f"unknown workload {config.workload!r}: square, trace or poisson")


def _trace(config: ExperimentConfig, model: StepTimeModel, fleet: FleetConfig) -> Workload:
    probe = shape_of(trace_workload(config.trace, config.duration_s, 1e-9, seed=config.seed))
    rates = worker_rates(model, fleet, probe.isl_mean, probe.osl_mean, probe.hit_mean, config.itl_ms)
    mean_rps = rates.fleet_rps(config.max_workers) * config.trace_load
    requests = trace_workload(config.trace, config.duration_s, mean_rps, seed=config.seed)
    counts: dict[int, int] = {}
    for r in requests:
        counts[int(r.arrival_s // WINDOW_S)] = counts.get(int(r.arrival_s // WINDOW_S), 0) + 1
    ordered = sorted(counts.values())
    busy = ordered[int(0.75 * (len(ordered) - 1))]
    peak_rps = ordered[-1] / WINDOW_S
    share = (1 / rates.prefill_rps) / (1 / rates.prefill_rps + 1 / rates.decode_rps)
    shape = shape_of(requests)
    return Workload(requests, lambda t: counts.get(int(t // WINDOW_S), 0) >= busy, None,
                    _fit(rates.split(mean_rps, config.utilisation), config.max_workers),
                    _fit(rates.split(peak_rps, config.utilisation), config.max_workers), share,
                    f"Mooncake trace x{round(len(requests) / max(probe.requests, 1))} overlaid in {config.duration_s:g} s: "
                    f"{len(requests)} requests, mean {len(requests) / config.duration_s:.1f} req/s, peak 10-s "
                    f"{peak_rps:.1f} req/s, ISL {shape.isl_mean:.0f} ({shape.hit_mean:.0f} cached), OSL {shape.osl_mean:.0f}")


def _fit(split: tuple[int, int], budget: int) -> tuple[int, int]:
    """Scale a split down into the budget, keeping at least one worker each."""
    prefill, decode = split
    if prefill + decode <= budget:
        return split
    prefill = max(1, min(budget - 1, round(budget * prefill / (prefill + decode))))
    return prefill, budget - prefill


# ---- one arm ------------------------------------------------------------------------------------
def fresh(requests: list[SimRequest]) -> list[SimRequest]:
    return [SimRequest(r.request_id, r.arrival_s, r.input_len, r.output_len, r.cached_tokens) for r in requests]


def make_planner(config: ExperimentConfig, model: StepTimeModel, fleet: FleetConfig | None = None):
    from tidal.perf.profile import Profile
    from tidal.planner.core import Planner
    from tidal.planner.perf_model import PerfModel

    perf = PerfModel.from_profile(model) if isinstance(model, Profile) else PerfModel.default()
    planner_config = PlannerConfig(slo=SLO(ttft_ms=config.ttft_ms, itl_ms=config.itl_ms), max_workers=config.max_workers,
                                   min_prefill=1, min_decode=1, reactive_interval_s=config.interval_s,
                                   predictive_interval_s=config.predictive_interval_s,
                                   worker_startup_s=config.startup_s or (fleet.startup_s if fleet else 30.0))
    return Planner(planner_config, perf)


def run_arm(name: str, config: ExperimentConfig, fleet: FleetConfig, model: StepTimeModel, workload: Workload,
            split: tuple[int, int], planner=None) -> dict:
    sim = Fleet(fleet, model, split[0], split[1], interval_s=config.interval_s)
    result = sim.run(fresh(workload.requests), planner)
    return summarize(name, result, config, workload, split)


def met_slo(r: SimRequest, config: ExperimentConfig) -> bool:
    if r.finish_s is None or r.first_token_s is None:
        return False
    ttft_ok = (r.first_token_s - r.arrival_s) * 1000 <= config.ttft_ms
    return ttft_ok and (r.output_len < 2 or mean_itl_ms(r) <= config.itl_ms)


def mean_itl_ms(r: SimRequest) -> float:
    return (r.finish_s - r.first_token_s) * 1000 / (r.output_len - 1)


def summarize(name: str, result: FleetResult, config: ExperimentConfig, workload: Workload,
              split: tuple[int, int]) -> dict:
    requests = result.requests
    burst = [r for r in requests if workload.is_burst(r.arrival_s)]
    learnt = ([r for r in burst if r.arrival_s >= workload.learnt_from_s]
              if workload.learnt_from_s is not None else [])
    done = [r for r in requests if r.finish_s is not None]
    ttft = [(r.first_token_s - r.arrival_s) * 1000 for r in done]
    itl_req = [mean_itl_ms(r) for r in done if r.output_len > 1]
    return {
        "arm": name, "start_split": list(split), "requests": len(requests),
        "attainment": _share(requests, config), "attainment_burst": _share(burst, config),
        "attainment_burst_learnt": _share(learnt, config),
        "worker_seconds": result.worker_seconds, "ttft_ms_p90": percentile(ttft, 90),
        "itl_ms_p90": weighted_percentile(result.gaps, 90), "request_itl_ms_p90": percentile(itl_req, 90),
        "dropped": result.dropped, "adds": result.actions["add"], "removes": result.actions["remove"],
        "flips": result.actions["flip"], "refused": result.actions["refused"],
        "series": _series(result, config, workload),
    }


def _share(requests: list[SimRequest], config: ExperimentConfig) -> float | None:
    if not requests:
        return None
    return sum(met_slo(r, config) for r in requests) / len(requests)


def _series(result: FleetResult, config: ExperimentConfig, workload: Workload) -> dict:
    """Per WINDOW_S window: arrivals/s, TTFT p90 and request-ITL p90 of requests arriving in it, the
    fleet's ITL p90 (gaps), and the pools' active sizes at the window's end."""
    n = max(1, math.ceil(config.duration_s / WINDOW_S))
    arrivals: list[list[SimRequest]] = [[] for _ in range(n)]
    for r in result.requests:
        arrivals[min(n - 1, int(r.arrival_s // WINDOW_S))].append(r)
    gaps: list[list] = [[] for _ in range(n)]
    for g in result.gaps:
        if g[0] < n * WINDOW_S:
            gaps[int(g[0] // WINDOW_S)].append(g)
    pools: dict[str, list[int]] = {"prefill": [], "decode": [], "alive": []}
    rows = iter(result.timeline)
    row = next(rows, None)
    last = {key: 0 for key in pools}
    for i in range(n):  # the last row in each window (the one before, where the run ended early)
        while row is not None and row["time_s"] < (i + 1) * WINDOW_S:
            last = {key: row[key] for key in pools}
            row = next(rows, None)
        for key in pools:
            pools[key].append(last[key])
    done = [[r for r in window if r.finish_s is not None] for window in arrivals]
    return {
        "window_s": WINDOW_S,
        "rate": [len(w) / WINDOW_S for w in arrivals],
        "ttft_ms_p90": [percentile([(r.first_token_s - r.arrival_s) * 1000 for r in w], 90) for w in done],
        "itl_ms_p90": [weighted_percentile(g, 90) for g in gaps],
        "request_itl_ms_p90": [percentile([mean_itl_ms(r) for r in w if r.output_len > 1], 90) for w in done],
        **pools,
    }


# ---- the comparison -----------------------------------------------------------------------------
def best_static(config: ExperimentConfig, fleet: FleetConfig, model: StepTimeModel, workload: Workload,
                runner=None) -> tuple[dict, list[dict]]:
    """Bisect the smallest total reaching the goal for each of three prefill shares around the model's
    (its split, and 10 points either side); the cheapest that reaches it wins (else the best attainment)."""
    runner = runner or (lambda split: run_arm(f"static {split[0]}:{split[1]}", config, fleet, model, workload, split))
    tried: dict[tuple[int, int], dict] = {}

    def attempt(total: int, share: float) -> dict:
        prefill = min(total - 1, max(1, round(total * share)))
        split = (prefill, total - prefill)
        if split not in tried:
            tried[split] = runner(split)
        return tried[split]

    for share in (workload.prefill_share - 0.1, workload.prefill_share, workload.prefill_share + 0.1):
        low, high = 2, config.max_workers
        if attempt(high, share)["attainment"] < config.attainment_goal:
            continue
        while high - low > max(1, config.max_workers // 16):
            mid = (low + high) // 2
            if attempt(mid, share)["attainment"] >= config.attainment_goal:
                high = mid
            else:
                low = mid
    runs = list(tried.values())
    good = [r for r in runs if r["attainment"] >= config.attainment_goal]
    best = min(good, key=lambda r: r["worker_seconds"]) if good else max(runs, key=lambda r: r["attainment"])
    return best, runs


def compare(config: ExperimentConfig, fleet: FleetConfig, model: StepTimeModel, with_static: bool = True,
            with_planner: bool = True) -> dict:
    workload = build_workload(config, model, fleet)
    arms = []
    if with_planner:
        arms.append(run_arm("planner", config, fleet, model, workload, workload.calm_split,
                            planner=make_planner(config, model, fleet)))
    peak = run_arm(f"peak {workload.peak_split[0]}:{workload.peak_split[1]}", config, fleet, model, workload,
                   workload.peak_split)
    arms.append(peak)
    sweep = []
    if with_static:
        best, sweep = best_static(config, fleet, model, workload)
        arms.append({**best, "arm": f"best static {best['start_split'][0]}:{best['start_split'][1]}"})
    for arm in arms:
        arm["worker_seconds_vs_peak"] = arm["worker_seconds"] / peak["worker_seconds"]
    return {"config": _jsonable(config), "fleet": asdict(fleet), "workload": workload.description,
            "arms": arms, "sweep": [{k: v for k, v in r.items() if k != "series"} for r in sweep]}


def _jsonable(config: ExperimentConfig) -> dict:
    return {**asdict(replace(config)), "lengths": asdict(config.lengths)}


def table(results: list[dict]) -> str:
    lines = ["| experiment | arm | SLO met (all) | SLO met (bursts) | bursts from period 3 | worker-s | vs peak | "
             "TTFT p90 ms | ITL p90 ms | dropped | adds/removes/flips |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for result in results:
        for arm in result["arms"]:
            lines.append(f"| {result['name']} | {arm['arm']} | {_pct(arm['attainment'])} | "
                         f"{_pct(arm['attainment_burst'])} | {_pct(arm.get('attainment_burst_learnt'))} | "
                         f"{arm['worker_seconds']:.0f} | "
                         f"{arm['worker_seconds_vs_peak']:.2f} | {_num(arm['ttft_ms_p90'])} | {_num(arm['itl_ms_p90'])} | "
                         f"{arm['dropped']} | {arm['adds']}/{arm['removes']}/{arm['flips']} |")
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"
