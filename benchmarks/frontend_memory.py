"""Does the frontend give memory back after large prompts, and does it keep answering while it tokenizes
them? `tidal serve` on the embedded model (one API server, so the frontend is the launcher's own
process) gets N large chat prompts, one after another, while a poller asks /health every 50 ms.

Prints one row per phase: the serving process's RSS (/proc/PID/status VmRSS) at baseline (after one
small request), its peak during the large prompts, and after them (once it has been idle a few
seconds), the answers the large prompts got, and the slowest /health answer during them. The JSON
(`--json`) has every sample.

    python -m benchmarks.frontend_memory [--prompt-chars 7500000] [--requests 8] [--settle-s 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections import Counter
from pathlib import Path

import httpx

from tidal.bench.procs import machine_info
from tidal.bench.rss import MIB, rss_bytes
from tidal.bench.server import ServerProcess, tidal_command
from tidal.runtime.ports import free_port

WORDS = ("tide moon harbour sail anchor wave current shore rope deck captain chart compass storm "
         "calm north south east west salt wind gull reef buoy lantern keel mast hull port starboard").split()


def large_prompt(chars: int, seed: int) -> str:
    """Seeded word soup of `chars` characters (words repeat, their order doesn't)."""
    rng = random.Random(seed)
    words = rng.choices(WORDS, k=chars // 5 + 1)
    return " ".join(words)[:chars]


def rss_mb(pid: int) -> float:
    return (rss_bytes(pid) or 0) / MIB


class Sampler:
    """RSS of one process and /health latency, every `interval_s`, until stopped."""

    def __init__(self, url: str, pid: int, interval_s: float = 0.05) -> None:
        self.url, self.pid, self.interval_s = url, pid, interval_s
        self.samples: list[dict] = []

    async def run(self, client: httpx.AsyncClient, stop: asyncio.Event) -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            response = await client.get(self.url + "/health", timeout=60)
            self.samples.append({"t": t0, "health_s": time.monotonic() - t0, "status": response.status_code,
                                 "rss_mb": rss_mb(self.pid)})
            await asyncio.sleep(self.interval_s)


async def chat(client: httpx.AsyncClient, url: str, model: str, content: str, max_tokens: int) -> int:
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
    response = await client.post(url + "/v1/chat/completions", json=body, timeout=600)
    return response.status_code


async def measure(url: str, pid: int, args: argparse.Namespace) -> dict:
    async with httpx.AsyncClient() as client:
        model = (await client.get(url + "/v1/models")).json()["data"][0]["id"]
        await chat(client, url, model, "Hello!", 4)
        await asyncio.sleep(args.settle_s)
        baseline = rss_mb(pid)
        sampler, stop = Sampler(url, pid), asyncio.Event()
        poller = asyncio.create_task(sampler.run(client, stop))
        statuses: Counter = Counter()
        start = time.monotonic()
        for index in range(args.requests):
            statuses[await chat(client, url, model, large_prompt(args.prompt_chars, index), 4)] += 1
        elapsed = time.monotonic() - start
        stop.set()
        await poller
        await asyncio.sleep(args.settle_s)
        after = rss_mb(pid)
    return {"baseline_rss_mb": baseline, "peak_rss_mb": max([baseline] + [s["rss_mb"] for s in sampler.samples]),
            "after_rss_mb": after, "statuses": dict(statuses), "elapsed_s": elapsed,
            "health_max_s": max((s["health_s"] for s in sampler.samples), default=0.0),
            "samples": sampler.samples}


def print_table(result: dict, args: argparse.Namespace) -> None:
    print(f"{args.requests} chat prompts of {args.prompt_chars:,} characters, one at a time "
          f"({result['elapsed_s']:.1f} s; answers: {result['statuses']})")
    print("| phase | RSS MB |")
    print("|---|---:|")
    for phase in ("baseline", "peak", "after"):
        print(f"| {phase} | {result[f'{phase}_rss_mb']:.0f} |")
    print(f"slowest /health during the prompts: {result['health_max_s'] * 1000:.0f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt-chars", type=int, default=7_500_000)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--settle-s", type=float, default=5.0, help="idle time before the baseline and after")
    parser.add_argument("--serve-args", default="", help="extra `tidal serve` flags, space-separated")
    parser.add_argument("--log", default="/tmp/tidal-bench/logs/frontend_memory.log")
    parser.add_argument("--json", default="/tmp/tidal-bench/frontend_memory.json")
    args = parser.parse_args()
    port = free_port()
    Path(args.log).parent.mkdir(parents=True, exist_ok=True)
    command = tidal_command(["serve", "--api-servers", "1", "--port", str(port), *args.serve_args.split()])
    with ServerProcess(command, args.log, port, name="tidal serve") as server:
        server.start_and_wait()
        result = asyncio.run(measure(server.url, server.pid, args))
    print_table(result, args)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"args": vars(args), "machine": machine_info(), **result}, indent=1))


if __name__ == "__main__":
    main()
