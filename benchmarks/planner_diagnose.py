"""Where the planner loses a square-wave burst: its decisions one by one, and a sensitivity sweep.

    python -m benchmarks.planner_diagnose            # timeline of the second burst + sweep
    python -m benchmarks.planner_diagnose --no-sweep

16 simulated workers with the linear timing model (`tidal/sim/timing.py` defaults), the fleet
simulator of `tidal sim-fleet`, reactive loop every 1 s, predictive loop every 10 s. The timeline
prints every decision that acted and one line per 10 s of the window around the burst. The sweep
varies start-up time, burst length and the planner's budget (as a multiple of the peak split) and
prints burst attainment and worker-seconds against peak provisioning. Figures: docs/planner.md.
"""

from __future__ import annotations

import argparse

from tidal.planner.core import Planner
from tidal.planner.perf_model import PerfModel
from tidal.planner.types import SLO, PlannerConfig
from tidal.sim.fleet_config import FleetConfig
from tidal.sim.fleet_experiment import ExperimentConfig, build_workload, run_arm
from tidal.sim.timing import TimingModel

WORKERS = 16


def run(startup_s: float, calm_s: float, burst_s: float, budget_x: float,
        log: list[tuple[float, str]] | None = None):
    config = ExperimentConfig(workload="square", max_workers=WORKERS, duration_s=3 * (calm_s + burst_s),
                              calm_s=calm_s, burst_s=burst_s, interval_s=1.0, predictive_interval_s=10.0)
    fleet, model = FleetConfig(startup_s=startup_s), TimingModel()
    workload = build_workload(config, model, fleet)
    planner = Planner(PlannerConfig(slo=SLO(ttft_ms=config.ttft_ms, itl_ms=config.itl_ms),
                                    max_workers=int(WORKERS * budget_x), min_prefill=1, min_decode=1,
                                    reactive_interval_s=1.0, predictive_interval_s=10.0), PerfModel.default())
    if log is not None:
        step = planner.step

        def logged(obs):
            decision = step(obs)
            if decision.actions or int(obs.time_s) % 10 == 0:
                acts = ", ".join(f"{a.kind} {a.role} ({a.reason})" for a in decision.actions) or "-"
                log.append((obs.time_s, f"t={obs.time_s:5.0f} {decision.loop:<10} {acts:<40} {decision.explanation}"))
            return decision
        planner.step = logged
    result = run_arm("planner", config, fleet, model, workload, workload.calm_split, planner)
    peak = run_arm("peak", config, fleet, model, workload, workload.peak_split)
    return result, peak, workload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-sweep", action="store_true")
    args = parser.parse_args()
    log: list[tuple[float, str]] = []
    calm_s, burst_s = 120.0, 60.0
    result, _, workload = run(5.0, calm_s, burst_s, 1.0, log)
    print(f"calm split {workload.calm_split}, peak split {workload.peak_split}, "
          f"burst attainment {result['attainment_burst']:.3f}")
    start = calm_s - 20  # the first burst starts at calm_s
    for time_s, line in log:
        if start <= time_s <= calm_s + burst_s + 70:
            print(line)
    if args.no_sweep:
        return
    print("\n| start-up s | calm s | burst s | budget x peak | burst attainment | worker-s vs peak | adds/removes/flips |")
    print("|---|---|---|---|---|---|---|")
    for startup_s, calm, burst, budget_x in ((5, 40, 20, 1.0), (5, 40, 20, 1.5), (5, 120, 60, 1.5),
                                             (10, 240, 120, 1.25), (10, 240, 120, 1.5)):
        result, peak, _ = run(startup_s, calm, burst, budget_x)
        print(f"| {startup_s} | {calm} | {burst} | {budget_x} | {result['attainment_burst']:.1%} | "
              f"{result['worker_seconds'] / peak['worker_seconds']:.2f} | "
              f"{result['adds']}/{result['removes']}/{result['flips']} |", flush=True)


if __name__ == "__main__":
    main()
