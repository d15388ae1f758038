"""Is the frontend the bottleneck of the headline chat runs? The real frontend and router (`tidal sim`:
OpenAI API, KV-aware router, detokenizer, SSE) in front of simulated workers that keep the time of
the H200 profile (`benchmarks/results/profile-llama-3.1-8b-NVIDIA-H200.json`), driven by the headline's
chat workload (6 turns, 2-s think time, 600-word system prompt, 150 tokens out) at rising session
rates. No GPU: the workers compute nothing, so what limits the output here is the serving process.

Per rate it prints output tokens/s against what the arrivals ask for, ITL p50/p90/p99 (p50 = 0 means
tokens reach the client several per chunk: the stream falls behind the engine), TTFT p90, worst stall
p99, and the CPU (1.0 = one core) and CPU microseconds per streamed token of each process: the
serving process(es) (`tidal sim` and, with `--api-servers N`, its API server processes), the
simulated workers (in processes of their own, `--sim-worker-processes`, one per worker: their CPU
is not the frontend's) and this script, the load generator. The JSON row lists every process. The
step times are the profile's, so a frontend that keeps up shows ITL near the simulated step time
(about 8-10 ms at these batches).

Processes are told apart through /proc: the children of `tidal sim` named `tidal-sim-wkr` are the
simulated workers, multiprocessing's resource tracker is left out, the rest (and `tidal sim`
itself) is the serving tier.

    python -m benchmarks.frontend_capacity [--rates 2.5,5,7.5,10] [--workers 2] [--api-servers 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from tidal.bench.headline import GPU_FAMILIES
from tidal.bench.metrics import point_metrics
from tidal.bench.procs import cpu_by_role, cpu_seconds, sim_process_roles
from tidal.bench.runner import Bench, BenchConfig
from tidal.bench.server import ServerProcess, tidal_command
from tidal.runtime.ports import free_port

PROFILE = Path(__file__).resolve().parents[1] / "benchmarks/results/profile-llama-3.1-8b-NVIDIA-H200.json"


async def measure(url: str, rate: float, warmup_s: float, measure_s: float, pid: int, seed: int) -> dict:
    config = BenchConfig(url=url, workload="chat", rate=rate, seed=seed, sessions=10**9, requests=10**9,
                         duration_s=warmup_s + measure_s, timeout_s=300.0, arrival="poisson", progress=False,
                         **GPU_FAMILIES["chat"].bench)
    bench = Bench(config)
    task = asyncio.create_task(bench.run())
    await asyncio.sleep(warmup_s)
    roles = sim_process_roles(pid)
    cpu0, own0, t0 = {p: cpu_seconds(p) for p in roles}, time.process_time(), time.monotonic()
    await asyncio.sleep(measure_s)
    cpu1, own1, t1 = {p: cpu_seconds(p) for p in roles}, time.process_time(), time.monotonic()
    try:
        await asyncio.wait_for(task, timeout=60)
    except asyncio.TimeoutError:
        pass  # wait_for cancelled the bench: what ran past 60 s counts as unfinished
    metrics = point_metrics(bench.records, warmup_s, measure_s, gpus=2)
    span = t1 - t0
    tok_s = metrics["output_tokens_per_s"]
    processes, totals = cpu_by_role(roles, cpu0, cpu1, span, tok_s)
    client = (own1 - own0) / span
    return {"rate": rate, "output_tok_s": tok_s, "processes": processes, **totals, "client_cores": client,
            "client_cpu_us_per_token": 1e6 * client / tok_s if tok_s else None, **metrics}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default="2.5,5,7.5,10", help="chat sessions per second")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--api-servers", type=int, default=1, help="`tidal sim --api-servers`")
    parser.add_argument("--warmup-s", type=float, default=20.0)
    parser.add_argument("--measure-s", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON lines, one per rate")
    args = parser.parse_args()
    port = free_port()
    log_path = Path(args.out or "/tmp/frontend_capacity.jsonl").with_suffix(".log")
    print(f"{'sessions/s':>10} {'out tok/s':>9} {'ITL p50':>7} {'p90':>5} {'p99':>5} {'TTFT p90':>8} "
          f"{'stall p99':>9} {'serving CPU':>11} {'us/token':>8} {'workers CPU':>11} {'us/token':>8} "
          f"{'client CPU':>10} {'us/token':>8}")
    rows = []
    for rate in [float(x) for x in args.rates.split(",")]:
        command = tidal_command(["sim", "--workers", str(args.workers), "--profile", str(PROFILE), "--router", "kv",
                                 "--sim-worker-processes", str(args.workers), "--api-servers", str(args.api_servers),
                                 "--port", str(port), "--log-level", "warning"])
        with ServerProcess(command, log_path, port, name="tidal sim") as server:  # a fresh server per rate: no cache
            server.start_and_wait()
            row = asyncio.run(measure(server.url, rate, args.warmup_s, args.measure_s, server.pid, args.seed))
        rows.append(row)
        itl, ttft, stall = row["itl_ms"], row["ttft_ms"], row["worst_stall_ms"]
        print(f"{rate:>10g} {row['output_tok_s']:>9.0f} {itl['p50'] or 0:>7.1f} {itl['p90'] or 0:>5.1f} "
              f"{itl['p99'] or 0:>5.1f} {ttft['p90'] or 0:>8.0f} {stall['p99'] or 0:>9.0f} "
              f"{row['serving_cores']:>11.2f} {row['serving_cpu_us_per_token'] or 0:>8.0f} "
              f"{row.get('sim-worker_cores', 0):>11.2f} {row.get('sim-worker_cpu_us_per_token') or 0:>8.0f} "
              f"{row['client_cores']:>10.2f} {row['client_cpu_us_per_token'] or 0:>8.0f}", flush=True)
    if args.out:
        with open(args.out, "a") as f:
            for row in rows:
                f.write(json.dumps({k: v for k, v in row.items() if k != "windows"}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
