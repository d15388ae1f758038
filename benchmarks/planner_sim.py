"""The SLA planner in the fleet simulator against static prefill:decode splits (issue 7, part 4).

    python -m benchmarks.planner_sim [--workers 64,256] [--startup-s 30] [--jobs 2]

Runs, on the measured H200 profile of Llama-3.1-8B (benchmarks/results/profile-llama-3.1-8b-NVIDIA-H200.json):

- square: a square wave, 6 periods of 140 s calm at 0.5x and 60 s burst at 2x the rate half the
  budget carries at 80% utilisation (so the burst needs the whole budget), ISL 2048 +- 50% (30% prefix
  hits), OSL 256 +- 50%; SLO TTFT p90 1000 ms, ITL 50 ms; bursts from the third period on are also
  reported apart (the planner's seasonal predictor has seen two periods by then);
- trace: the Mooncake conversation trace (../shared/traces), its hour compressed into 600 s and overlaid
  until its mean rate is half the budget's capacity; SLO TTFT 2000 ms (prompts average 12k tokens and
  reach 126k: the longest take over a second to prefill alone), ITL 50 ms;

each with 64 and 256 workers, arms: the planner (from the calm/mean split), peak provisioning, and the
best static split (bisection per prefill share). Prints a table; writes
benchmarks/results/planner_sim.json and docs/img/planner_sim_<workload>_<workers>.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from tidal.perf.profile import load_profile
from tidal.sim.fleet_config import FleetConfig
from tidal.sim.fleet_experiment import ExperimentConfig, compare, table
from tidal.sim.fleet_plots import plot_experiment

ROOT = Path(__file__).resolve().parents[1]

PROFILE = ROOT / "benchmarks/results/profile-llama-3.1-8b-NVIDIA-H200.json"


def experiment(args: tuple[str, int, float]) -> dict:
    workload, workers, startup_s = args
    model = load_profile(PROFILE)
    fleet = FleetConfig(token_budget=model.prefill_knee_tokens(), startup_s=startup_s)
    config = ExperimentConfig(workload=workload, max_workers=workers,
                              ttft_ms=2000.0 if workload == "trace" else 1000.0,
                              duration_s=1200.0 if workload == "square" else 600.0)
    started = time.perf_counter()
    result = compare(config, fleet, model)
    result["name"] = f"{workload}, {workers} workers"
    result["wall_s"] = time.perf_counter() - started
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="64,256")
    parser.add_argument("--workloads", default="square,trace")
    parser.add_argument("--startup-s", type=float, default=30.0)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--output", default=str(ROOT / "benchmarks/results/planner_sim.json"))
    parser.add_argument("--plots", default=str(ROOT / "docs/img"))
    args = parser.parse_args()
    jobs = [(w, int(n), args.startup_s) for n in args.workers.split(",") for w in args.workloads.split(",")]
    results = []
    with ProcessPoolExecutor(args.jobs) as pool:
        for future in as_completed([pool.submit(experiment, job) for job in jobs]):
            result = future.result()  # plotted and shown as each experiment ends
            workload, workers = result["config"]["workload"], result["config"]["max_workers"]
            plot_experiment(result, Path(args.plots) / f"planner_sim_{workload}_{workers}.png",
                            f"{result['name']}: {result['workload']}")
            print(f"{result['name']}: {result['workload']} ({result['wall_s']:.0f} s wall)")
            print(table([result]), flush=True)
            results.append(result)
    results.sort(key=lambda r: (r["config"]["max_workers"], r["config"]["workload"]))
    print(table(results))
    slim = [{**r, "arms": [{k: v for k, v in a.items() if k != "series" or a["arm"] == "planner"}
                           for a in r["arms"]]} for r in results]
    Path(args.output).write_text(json.dumps({"profile": PROFILE.name, "startup_s": args.startup_s,
                                             "experiments": slim}, indent=1) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
