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

    PYTHONPATH=. python benchmarks/frontend_capacity.py [--rates 2.5,5,7.5,10] [--workers 2] [--api-servers 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.headline import GPU_FAMILIES, Server, free_port, process_cpu_s  # noqa: E402
from benchmarks.headline_metrics import point_metrics  # noqa: E402
from tidal.bench.runner import Bench, BenchConfig  # noqa: E402

PROFILE = REPO / "benchmarks/results/profile-llama-3.1-8b-NVIDIA-H200.json"
SIM_WORKER_NAME = "tidal-sim-wkr"  # tidal.sim.workers.SIM_PROCESS_NAME, as /proc/PID/comm shows it


def descendants(root: int) -> dict[int, str]:
    """Every live process under `root` (not itself): pid -> command line, from /proc."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parents[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = {}, [root]
    while frontier:
        parent = frontier.pop()
        for pid in (p for p, pp in parents.items() if pp == parent):
            command = cmdline(pid)
            if command is None:
                continue
            found[pid] = command
            frontier.append(pid)
    return found


def cmdline(pid: int) -> str | None:
    """A live process's command line (None once it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None


def cpu_seconds(pids: list[int] | int) -> float:
    """User + system CPU seconds of these processes so far (one that is gone counts 0)."""
    return sum(process_cpu_s(pid) or 0.0 for pid in ([pids] if isinstance(pids, int) else pids))


def sim_processes(root: int) -> dict[int, str]:
    """`tidal sim`'s processes by role: pid -> "serving" or "sim-worker" (the tracker left out)."""
    roles = {root: "serving"}
    for pid, cmdline in descendants(root).items():
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        if comm == SIM_WORKER_NAME:
            roles[pid] = "sim-worker"
        elif "resource_tracker" not in cmdline:
            roles[pid] = "serving"
    return roles


def per_process_cpu(roles: dict[int, str], cpu0: dict[int, float], cpu1: dict[int, float], span_s: float,
                    tok_s: float) -> tuple[list[dict], dict]:
    """Each process's cores and CPU microseconds per streamed token, and the sums per role."""
    rows, totals = [], {}
    for pid, role in roles.items():
        cores = (cpu1[pid] - cpu0[pid]) / span_s
        rows.append({"pid": pid, "role": role, "cores": cores, "cpu_us_per_token": 1e6 * cores / tok_s if tok_s else None})
        totals[f"{role}_cores"] = totals.get(f"{role}_cores", 0.0) + cores
        totals[f"{role}_cores_max"] = max(totals.get(f"{role}_cores_max", 0.0), cores)
    for role in set(roles.values()):
        totals[f"{role}_cpu_us_per_token"] = 1e6 * totals[f"{role}_cores"] / tok_s if tok_s else None
    return rows, totals


async def measure(url: str, rate: float, warmup_s: float, measure_s: float, pid: int, seed: int) -> dict:
    config = BenchConfig(url=url, workload="chat", rate=rate, seed=seed, sessions=10**9, requests=10**9,
                         duration_s=warmup_s + measure_s, timeout_s=300.0, arrival="poisson", progress=False,
                         **GPU_FAMILIES["chat"].bench)
    bench = Bench(config)
    task = asyncio.create_task(bench.run())
    await asyncio.sleep(warmup_s)
    roles = sim_processes(pid)
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
    processes, totals = per_process_cpu(roles, cpu0, cpu1, span, tok_s)
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
        server = Server(["sim", "--workers", str(args.workers), "--profile", str(PROFILE), "--router", "kv",
                         "--sim-worker-processes", str(args.workers), "--api-servers", str(args.api_servers),
                         "--port", str(port), "--log-level", "warning"], log_path, f"http://127.0.0.1:{port}")
        server.start()  # a fresh server per rate: no cache carried over
        try:
            row = asyncio.run(measure(server.url, rate, args.warmup_s, args.measure_s, server.proc.pid, args.seed))
        finally:
            server.stop()
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
