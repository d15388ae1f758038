"""CPU per streamed token on the frontend's per-token path. The real frontend and router (`tidal sim`)
in front of simulated workers, driven by N concurrent streaming chat requests (closed loop: each
client starts its next request as soon as the last ended) from this process, so the client's CPU is
not counted. Reports streamed tokens/s (the server's `tidal_generation_tokens` counter) and the
serving process's CPU microseconds per streamed token: the whole process, and its main thread alone
(the event loop: HTTP, router, detokenizer, SSE), since the simulated workers may run on threads of
the same process.

    python -m benchmarks.frontend_path [--concurrency 64] [--max-tokens 256]
        [--timing base_s=0.02] [--workers 2] [--measure-s 20] [--py-spy FILE] [--out FILE]

`--py-spy FILE` records the serving process during the measured window (raw collapsed stacks,
per thread) with py-spy, which must be installed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from tidal.bench.procs import cpu_times
from tidal.bench.server import ServerProcess, tidal_command
from tidal.runtime.ports import free_port

_TOKENS_RE = re.compile(rb"^tidal_generation_tokens_total(?:{[^}]*})? (\S+)$", re.M)  # one model
_USAGE_RE = re.compile(rb'"completion_tokens":(\d+)')


def _py_spy() -> str:
    beside = Path(sys.executable).parent / "py-spy"  # a venv's own scripts first
    return str(beside) if beside.exists() else "py-spy"


def hide_modules(names: list[str]) -> str:
    """A folder that, first on PYTHONPATH, makes `import NAME` fail: uvicorn then falls back to
    h11 (httptools hidden) or the stdlib loop (uvloop hidden), to measure without them."""
    folder = tempfile.mkdtemp(prefix="tidal-hide-")
    for name in names:
        Path(folder, f"{name}.py").write_text(f"raise ImportError('{name} hidden by frontend_path.py')\n")
    return folder


async def generated_tokens(session: aiohttp.ClientSession, url: str) -> float:
    async with session.get(url + "/metrics") as resp:
        body = await resp.read()
    match = _TOKENS_RE.search(body)
    return float(match.group(1)) if match else float("nan")


class Client:
    """Closed-loop streaming chat requests; counts requests, chunks and usage-reported tokens."""

    def __init__(self, url: str, max_tokens: int, prompt_words: int) -> None:
        self.url = url
        self.body = {"model": "sim", "stream": True, "max_tokens": max_tokens,
                     "stream_options": {"include_usage": True},
                     "messages": [{"role": "user", "content": " ".join(["hello"] * prompt_words)}]}
        self.requests = self.tokens = self.events = self.errors = 0
        self.stopping = False

    async def loop(self, session: aiohttp.ClientSession) -> None:
        while not self.stopping:
            try:
                await self.one(session)
            except (aiohttp.ClientError, asyncio.TimeoutError):
                self.errors += 1
                await asyncio.sleep(0.1)

    async def one(self, session: aiohttp.ClientSession) -> None:
        tail = b""
        async with session.post(self.url + "/v1/chat/completions", json=self.body) as resp:
            if resp.status != 200:
                self.errors += 1
                await resp.read()
                await asyncio.sleep(0.1)
                return
            async for chunk in resp.content.iter_any():
                self.events += chunk.count(b"data: ")
                tail = (tail + chunk)[-400:]
        match = _USAGE_RE.search(tail)
        self.requests += 1
        self.tokens += int(match.group(1)) if match else 0


async def measure(url: str, pid: int, args) -> dict:
    client = Client(url, args.max_tokens, args.prompt_words)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        tasks = [asyncio.create_task(client.loop(session)) for _ in range(args.concurrency)]
        await asyncio.sleep(args.warmup_s)
        spy = None
        if args.py_spy:
            spy = subprocess.Popen([_py_spy(), "record", "--pid", str(pid), "--nonblocking", "--threads", "-f", "raw",
                                    "-r", str(args.py_spy_rate), "--gil", "-d", str(int(args.measure_s)), "-o", args.py_spy],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        tok0, req0, ev0 = await generated_tokens(session, url), client.requests, client.events
        cpu0, main0, t0 = cpu_times(pid), cpu_times(pid, pid), time.monotonic()
        await asyncio.sleep(args.measure_s)
        cpu1, main1, t1 = cpu_times(pid), cpu_times(pid, pid), time.monotonic()
        tok1, req1, ev1 = await generated_tokens(session, url), client.requests, client.events
        client.stopping = True
        if spy is not None:
            spy.wait(timeout=60)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    span = t1 - t0
    tokens = tok1 - tok0
    proc, main_user, main_sys = sum(cpu1) - sum(cpu0), main1[0] - main0[0], main1[1] - main0[1]
    return {"concurrency": args.concurrency, "max_tokens": args.max_tokens, "timing": args.timing,
            "without": args.without, "uvloop": args.uvloop, "tok_s": tokens / span, "requests_s": (req1 - req0) / span,
            "events_per_token": (ev1 - ev0) / tokens, "process_cpu": proc / span,
            "main_cpu": (main_user + main_sys) / span, "process_us_per_token": 1e6 * proc / tokens,
            "main_us_per_token": 1e6 * (main_user + main_sys) / tokens,
            "main_user_us_per_token": 1e6 * main_user / tokens, "main_sys_us_per_token": 1e6 * main_sys / tokens,
            "errors": client.errors, "client_tokens_per_request": client.tokens / max(client.requests, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--prompt-words", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timing", default="base_s=0.02", help="simulated step times (tidal sim --timing)")
    parser.add_argument("--sim-args", default="", help="more `tidal sim` arguments, space-separated")
    parser.add_argument("--warmup-s", type=float, default=5.0)
    parser.add_argument("--measure-s", type=float, default=20.0)
    parser.add_argument("--py-spy", default=None, help="record the serving process into this file")
    parser.add_argument("--py-spy-rate", type=int, default=500, help="samples per second")
    parser.add_argument("--without", default="", help="hide these modules from the server, e.g. httptools,uvloop")
    parser.add_argument("--uvloop", action="store_true", help="run the server on uvloop (a sitecustomize installs it)")
    parser.add_argument("--out", default=None, help="append the result as a JSON line")
    args = parser.parse_args()
    if args.without or args.uvloop:
        folder = hide_modules([name for name in args.without.split(",") if name])
        if args.uvloop:
            Path(folder, "sitecustomize.py").write_text("import uvloop\nuvloop.install()\n")
        os.environ["PYTHONPATH"] = folder + os.pathsep + os.environ.get("PYTHONPATH", "")
    port = free_port()
    log_path = Path(args.out or "/tmp/frontend_path.jsonl").with_suffix(".log")
    command = tidal_command(["sim", "--workers", str(args.workers), "--timing", args.timing, "--port", str(port),
                             "--log-level", "warning", *args.sim_args.split()])
    with ServerProcess(command, log_path, port, name="tidal sim") as server:
        server.start_and_wait()
        row = asyncio.run(measure(server.url, server.pid, args))
    print(f"{'conc':>4} {'tok/s':>7} {'events/tok':>10} {'proc CPU':>8} {'main CPU':>8} "
          f"{'proc us/tok':>11} {'main us/tok':>11} {'(user':>6} {'sys)':>5} {'errors':>6}")
    print(f"{row['concurrency']:>4} {row['tok_s']:>7.0f} {row['events_per_token']:>10.2f} {row['process_cpu']:>8.2f} "
          f"{row['main_cpu']:>8.2f} {row['process_us_per_token']:>11.1f} {row['main_us_per_token']:>11.1f} "
          f"{row['main_user_us_per_token']:>6.1f} {row['main_sys_us_per_token']:>5.1f} {row['errors']:>6}")
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
