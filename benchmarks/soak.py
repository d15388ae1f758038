"""Soak: mixed traffic against one deployment for a long time, and the RSS of every process over it.

Starts a server (`tidal serve -f CONFIG` on the embedded model, CPU; or `tidal sim` for a lighter
run), drives mixed traffic from this process (`tidal.bench.mixed_traffic`: chat sessions, short and
long completions, streams cut mid-way, bad requests) for `--duration-s`, samples the RSS of the
server and every process under it every `--sample-s` (`tidal.bench.rss`), and prints per process:
RSS at the end of the warm-up, at the end, the maximum and the growth in between (the goal: none
after warm-up). Writes everything (samples included) as JSON, the server's log to the temp folder.
Not a CI test: an hour by default.

    python -m benchmarks.soak [--server serve|sim] [--config examples/agg_router.yaml]
        [--duration-s 3600] [--warmup-s 600] [--sample-s 10] [--concurrency 4] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import tempfile
import threading
import time
from pathlib import Path

import httpx

from tidal.bench.mixed_traffic import MixedTraffic
from tidal.bench.procs import busy_cpu_s, machine_info
from tidal.bench.rss import RssSample, RssSampler, format_rows, growth_rows
from tidal.bench.server import ServerProcess, tidal_command
from tidal.runtime.ports import free_port


def server_command(args: argparse.Namespace, port: int) -> list[str]:
    if args.server == "sim":
        return tidal_command(["sim", "--workers", str(args.sim_workers), "--port", str(port)])
    return tidal_command(["serve", "-f", args.config, "--port", str(port)])


def worker_pids(url: str) -> dict[int, str]:
    """pid -> worker id from the router's table, ids joined by '+' where workers share a process (the
    simulator's); empty when it does not answer."""
    try:
        table = httpx.get(url + "/admin/workers", timeout=5).json()["workers"]
    except (httpx.HTTPError, ValueError, KeyError):
        return {}
    ids: dict[int, list[str]] = {}
    for w in table:
        if w.get("pid"):
            ids.setdefault(w["pid"], []).append(w["worker_id"])
    return {pid: "+".join(sorted(names)) for pid, names in ids.items()}


class SamplerThread(threading.Thread):
    """Samples RSS every `every_s` until stopped; also the machine's busy cores between samples."""

    def __init__(self, sampler: RssSampler, url: str, every_s: float, start_s: float) -> None:
        super().__init__(daemon=True)
        self.sampler, self.url, self.every_s, self.start_s = sampler, url, every_s, start_s
        self.samples: list[RssSample] = []
        self.busy_cores: list[float] = []
        self.halt = threading.Event()

    def run(self) -> None:
        busy0, t0 = busy_cpu_s(), time.monotonic()
        while not self.halt.is_set():
            self.samples.append(self.sampler.sample(time.monotonic() - self.start_s, worker_pids(self.url)))
            self.halt.wait(self.every_s)
            busy1, t1 = busy_cpu_s(), time.monotonic()
            self.busy_cores.append(round((busy1 - busy0) / (t1 - t0), 2))
            busy0, t0 = busy1, t1


def _mib(by_label: dict[str, int]) -> dict[str, float]:
    return {label: round(value / 2**20, 1) for label, value in by_label.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", choices=("serve", "sim"), default="serve")
    parser.add_argument("--config", default="examples/agg_router.yaml", help="for --server serve")
    parser.add_argument("--sim-workers", type=int, default=2, help="for --server sim")
    parser.add_argument("--duration-s", type=float, default=3600.0)
    parser.add_argument("--warmup-s", type=float, default=None, help="default: a sixth of the run, at most 600")
    parser.add_argument("--sample-s", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON (default benchmarks/results/soak-DATE.json)")
    args = parser.parse_args()
    warmup_s = args.warmup_s if args.warmup_s is not None else min(600.0, args.duration_s / 6)
    date = datetime.date.today().isoformat()
    out = Path(args.out or f"benchmarks/results/soak-{args.server}-{date}.json")
    port = free_port()
    command = server_command(args, port)
    log_path = Path(tempfile.gettempdir()) / f"{out.stem}.log"  # the server's log: read it, don't commit it
    with ServerProcess(command, log_path, port) as server:
        server.start()
        model = server.wait_ready(need_model=True)
        print(f"soak: {' '.join(command[1:])} ready in {server.start_s:.1f} s; model {model}; "
              f"{args.duration_s:.0f} s of traffic at concurrency {args.concurrency}, warm-up {warmup_s:.0f} s")
        start_s = time.monotonic()
        sampler = SamplerThread(RssSampler(server.pid), server.url, args.sample_s, start_s)
        sampler.start()
        traffic = MixedTraffic(server.url, model, args.concurrency, args.seed)
        tallies = asyncio.run(traffic.run(args.duration_s))
        ran_s = time.monotonic() - start_s
        sampler.halt.set()
        sampler.join()
        server.wait_idle()
        idle = sampler.sampler.sample(time.monotonic() - start_s, worker_pids(server.url))
    rows = growth_rows(sampler.samples, warmup_s)
    print(format_rows(rows))
    print("requests by kind:", json.dumps(tallies))
    result = {"command": " ".join(["python -m benchmarks.soak", *[f"--{k.replace('_', '-')} {v}" for k, v in
                                                                   vars(args).items() if v is not None]]),
              "server_command": command[1:], "date": date, "machine": machine_info(), "ran_s": round(ran_s, 1),
              "warmup_s": warmup_s, "rows": rows, "tallies": tallies, "busy_cores": sampler.busy_cores,
              "idle_after_mib": _mib(idle.rss_bytes),
              "samples": [{"time_s": round(s.time_s, 1), "rss_mib": _mib(s.rss_bytes), "anon_mib": _mib(s.anon_bytes)}
                          for s in sampler.samples]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}; the server's log is {log_path}")


if __name__ == "__main__":
    main()
