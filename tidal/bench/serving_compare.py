"""Servers side by side on one closed-loop workload (`python -m benchmarks.cpu_serving`,
`python -m benchmarks.api_server_cpu`): Tidal's server and vLLM's CPU build.

- `make_prompts`: n prompts of random token ids from a model's normal vocabulary (`vocab_range`),
  each with its own first token, so no two share a prefix;
- `Launch`: how each server starts (`tidal_server`, `vllm_server`: a `ServerProcess` each);
- `run_level`: one closed loop of streamed `/v1/completions` (`tidal.bench.client.closed_loop`), and
  `summarize` its records (tokens/s, TTFT, ITL, E2E percentiles, tokens per chunk);
- `LevelPlan` and `run_server`: one server started, warmed up, every concurrency level measured
  (`measure_level`: measured again with fresh prompts while other processes used more than
  `max_foreign_cores`), stopped; rows appended to `meta["rows"]`, saved after each;
- `markdown`: the rows as a table.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tidal.bench import vllm_peer
from tidal.bench.client import closed_loop
from tidal.bench.metrics import RequestRecord, percentile
from tidal.bench.procs import HostCpuMeter, wait_host_idle
from tidal.bench.server import ServerProcess, ServerStartError, checkout_env, tidal_command


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def vocab_range(hf_dir: Path, low: int) -> tuple[int, int, set[int]]:
    """Normal-vocab token id range [low, high) and the special ids to skip."""
    high = int(json.loads((hf_dir / "config.json").read_text())["vocab_size"])
    special: set[int] = set()
    if (hf_dir / "tokenizer.json").exists():
        special = {int(t["id"]) for t in json.loads((hf_dir / "tokenizer.json").read_text()).get("added_tokens", [])}
    return low, high, special


def make_prompts(n: int, input_len: int, low: int, high: int, special: set[int], seed: int) -> list[list[int]]:
    """n prompts of input_len random ids; first tokens all distinct (no shared prefix)."""
    rng = random.Random(seed)
    pool = [i for i in range(low, high) if i not in special]
    if n > len(pool):
        raise ValueError("too many prompts for distinct first tokens")
    return [[first] + [rng.choice(pool) for _ in range(input_len - 1)] for first in rng.sample(pool, n)]


def package_versions(python: str, *names: str) -> dict:
    code = ("import importlib.metadata as m, json, sys\nout = {}\nfor n in sys.argv[1:]:\n"
            "    try: out[n] = m.version(n)\n    except m.PackageNotFoundError: pass\nprint(json.dumps(out))\n")
    try:
        return json.loads(subprocess.run([python, "-c", code, *names], capture_output=True, text=True,
                                         timeout=60).stdout)
    except (OSError, subprocess.TimeoutExpired, json.JSONDecodeError):
        return {}


@dataclass(frozen=True)
class Launch:
    """How the compared servers start."""
    log_dir: Path
    vllm_python: str
    vllm_args: str = vllm_peer.DEFAULT_VLLM_ARGS
    """Extra flags for `vllm serve`."""
    vllm_env: str = ""
    """Extra KEY=VALUE environment for the vLLM server only."""
    tidal_python: str = sys.executable
    tidal_model: str = ""
    """MODEL_PATH for `tidal serve` (empty: the embedded GGUF)."""
    tidal_args: str = ""
    """Extra flags for `tidal serve`."""


def vllm_server(launch: Launch, dtype: str, hf_dir: Path, port: int, tmpdir: Path) -> ServerProcess:
    launcher = tmpdir / "vllm_launcher.py"
    launcher.write_text(vllm_peer.LAUNCHER)
    command = vllm_peer.vllm_command(launch.vllm_python, launcher, hf_dir, dtype, port, launch.vllm_args)
    return ServerProcess(command, launch.log_dir / f"vllm_{dtype}.log", port, name=f"vllm[{dtype}]",
                         env={**os.environ, **vllm_peer.vllm_env(launch.vllm_env)},
                         stop_signal=signal.SIGTERM, signal_group=True)


def tidal_server(launch: Launch, dtype: str, port: int) -> ServerProcess:
    serve = ["serve", *([launch.tidal_model] if launch.tidal_model else []), "--host", "127.0.0.1", "--port",
             str(port), "--dtype", dtype, *shlex.split(launch.tidal_args)]
    return ServerProcess(tidal_command(serve, launch.tidal_python), launch.log_dir / f"tidal_{dtype}.log", port,
                         name=f"tidal[{dtype}]", env=checkout_env(), stop_signal=signal.SIGTERM, signal_group=True)


@dataclass(frozen=True)
class LevelPlan:
    """How each concurrency level is measured."""
    input_len: int
    output_len: int
    request_timeout_s: float = 600.0
    startup_timeout_s: float = 600.0
    idle_wait_s: float = 120.0
    """Before each level, wait up to this long for the (shared) machine to be idle."""
    idle_threshold: float = 0.3
    """Busy cores that count as idle."""
    max_foreign_cores: float = 0.25
    """Measure a level again when other processes used more than this many cores during it."""


def run_level(url: str, model: str, prompts: list[list[int]], concurrency: int, max_tokens: int,
              timeout_s: float) -> tuple[list[RequestRecord], float]:
    bodies = [{"model": model, "prompt": p, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
              for p in prompts]
    return asyncio.run(closed_loop(url, "/v1/completions", bodies, concurrency, timeout_s))


def summarize(records: list[RequestRecord], wall: float, concurrency: int, input_len: int, output_len: int) -> dict:
    ok = [r for r in records if r.status == "ok"]
    ttft, e2e = [r.ttft_s for r in ok], [r.e2e_s for r in ok]
    itl = [x for r in ok for x in r.itl_s]
    out_tokens = sum(r.output_tokens for r in ok)
    chunks = sum(1 + len(r.itl_s) for r in ok)
    errors = [r.error for r in records if r.status != "ok"]
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return {"concurrency": concurrency, "num_requests": len(records), "completed": len(ok), "failed": len(errors),
            "errors": sorted(set(errors))[:5], "wall_s": wall, "output_tokens": out_tokens,
            "output_tok_s": out_tokens / wall if wall > 0 else None,
            "requests_per_s": len(ok) / wall if wall > 0 else None,
            "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99), "ttft_mean_s": mean(ttft),
            "itl_p50_s": percentile(itl, 50), "itl_p99_s": percentile(itl, 99), "itl_mean_s": mean(itl),
            "e2e_p50_s": percentile(e2e, 50), "e2e_p99_s": percentile(e2e, 99),
            "tokens_per_chunk": out_tokens / chunks if chunks else None,
            "prompt_tokens_seen": sorted({r.input_tokens for r in ok if r.input_tokens}),
            "short_outputs": sum(1 for r in ok if r.output_tokens != output_len), "expected_input_len": input_len}


def fmt(x, scale=1.0, nd=1):
    """`x * scale` with `nd` decimals; '-' for None."""
    return "-" if x is None else f"{x * scale:.{nd}f}"


def markdown(rows: list[dict]) -> str:
    lines = ["| server | dtype | conc | reqs | out tok/s | TTFT p50 (ms) | TTFT p99 (ms) | ITL p50 (ms) | ITL p99 (ms) "
             "| E2E p50 (s) | tok/chunk | failed | foreign CPU |", "|" + "|".join(["---"] * 13) + "|"]
    for r in rows:
        if "error" in r and "output_tok_s" not in r:
            lines.append(f"| {r['server']} | {r['dtype']} | {r.get('concurrency', '-')} | - | ERROR: "
                         f"{r['error'][:80]} | | | | | | | | |")
            continue
        lines.append(
            f"| {r['server']} | {r['dtype']} | {r['concurrency']} | {r['completed']}/{r['num_requests']} "
            f"| {fmt(r['output_tok_s'])} | {fmt(r['ttft_p50_s'], 1e3, 0)} | {fmt(r['ttft_p99_s'], 1e3, 0)} "
            f"| {fmt(r['itl_p50_s'], 1e3, 1)} | {fmt(r['itl_p99_s'], 1e3, 1)} | {fmt(r['e2e_p50_s'], 1, 2)} "
            f"| {fmt(r['tokens_per_chunk'], 1, 2)} | {r['failed']} | {fmt(r.get('cpu_foreign_cores'), 1, 2)} |")
    return "\n".join(lines)


def measure_level(plan: LevelPlan, srv: ServerProcess, model: str, attempts: list[list[int]], conc: int,
                  meta: dict) -> dict:
    """One concurrency level; measured again with fresh prompts while other processes were busy."""
    for attempt, prompts in enumerate(attempts):
        waited = wait_host_idle(plan.idle_wait_s, plan.idle_threshold)
        if waited >= plan.idle_wait_s > 0:
            log(f"machine still busy after {plan.idle_wait_s:.0f}s (>= {plan.idle_threshold} cores); measuring anyway")
        meter = HostCpuMeter(srv.pid)
        records, wall = run_level(srv.url, model, prompts, conc, plan.output_len, plan.request_timeout_s)
        row = {**summarize(records, wall, conc, plan.input_len, plan.output_len), **meter.stop(),
               "idle_wait_s": waited, "attempt": attempt}
        log(f"{srv.name} c={conc}: {fmt(row['output_tok_s'])} tok/s, TTFT p50 {fmt(row['ttft_p50_s'], 1e3, 0)} ms, "
            f"ITL p50 {fmt(row['itl_p50_s'], 1e3, 1)} ms, failed {row['failed']}, "
            f"foreign CPU {row['cpu_foreign_cores']:.2f} cores")
        if row["cpu_foreign_cores"] <= plan.max_foreign_cores or attempt == len(attempts) - 1:
            return row
        log(f"other processes used {row['cpu_foreign_cores']:.2f} cores during the level (> {plan.max_foreign_cores}); "
            "measuring again with fresh prompts")
        meta.setdefault("discarded_busy_levels", []).append(row)
    raise AssertionError("unreachable")


def run_server(plan: LevelPlan, srv: ServerProcess, base_row: dict, warm: list[list[int]],
               levels: list[list[list[int]]], concs: list[int], meta: dict, save) -> None:
    """Start one server, warm it up, measure every level into meta["rows"], stop it."""
    rows = meta["rows"]
    with srv:
        try:
            srv.start()
            model = srv.wait_ready(plan.startup_timeout_s, need_model=True)
            log(f"{srv.name} ready in {srv.start_s:.1f}s, model id {model!r}")
            if warm:
                records, wall = run_level(srv.url, model, warm, min(len(warm), max(concs)),
                                          min(16, plan.output_len), plan.request_timeout_s)
                bad = [r.error for r in records if r.status != "ok"]
                log(f"warmup: {len(records) - len(bad)}/{len(records)} ok in {wall:.1f}s"
                    + (f"; errors: {bad[:2]}" if bad else ""))
                if len(bad) == len(records):
                    raise RuntimeError(f"warmup failed: {bad[0]}")
            for li, conc in enumerate(concs):
                row = measure_level(plan, srv, model, [attempt[li] for attempt in levels], conc, meta)
                rows.append({**base_row, "startup_s": srv.start_s, "model_id": model, **row})
                save()
        except (ServerStartError, RuntimeError, OSError) as e:
            log(f"{srv.name} failed: {e}")
            rows.append({**base_row, "error": str(e)[-2000:]})
            save()


