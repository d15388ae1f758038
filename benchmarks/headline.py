"""Issue 9, the headline experiment: spiky multi-turn chat on the same GPUs served three ways.

Arms (`--arm`, on `--gpus` GPUs; Llama-3.1-8B shape, `dummy:llama-3.1-8b`, bf16):
- `agg`: every GPU an aggregated worker (role both), KV-aware router, chunked prefill at
  `--token-budget` (2048/4096/8192 tried; the best is kept in the report);
- `disagg`: a static prefill:decode split (`--split 1:1` on 2 GPUs; 1:3, 2:2, 3:1 on 4), the same
  router, every prompt prefilled remotely (`local_prefill_threshold: 0`), KV over `cuda_ipc`;
- `tidal`: conditional disaggregation (`local_prefill_threshold`, `--local-prefill`) plus the SLA
  planner (actuator local, flips allowed, `max_workers` = the GPUs, every GPU listed), starting at
  `--split` (1:1 on 2 GPUs, 2:2 on 4). The planner aims at the balanced SLO.

Workload groups (`--group`), each a list of points in priority order (a point = one workload at
one rate; rates are multiples of AGG's capacity for that workload, `--capacity`):
- `chat`: multi-turn chat sessions (6 turns, think time, growing history, a shared system prompt),
  Poisson session arrivals at 1.0x, gamma k=0.25 and k=0.5 at 1.0x, then Poisson at 0.5, 1.5, 0.25,
  0.75, 1.25x: the load grid and the burstiness sweep;
- `square`: the same sessions with square-wave arrivals, 15 s at 2x then 45 s at 0.5x, 3 periods;
- `trace`: the Mooncake conversation trace replayed (inputs capped, clock scaled to the rate), 0.5x, 1x;
- `control`: long prompts (4k-8k in, 225 out) and short single-turn (256 +- 50% in, 128 out), 0.5x, 1x.

Per point: warm-up (`--warmup-s`, requests scheduled in it are not counted) then the measured
window (`--measure-s`); arrivals stop at its end, requests still running `--grace-s` later are cut
(counted as misses). One JSON line per point is APPENDED to `--out`; points already in `--out` or
`--resume` are skipped. One invocation = one arm x one group, within `--budget-s` of wall time
(default 500 s: the GPU tool allows 600 s a command): points that would not fit are listed as
remaining, and the same command with `--resume` runs them next time.

Metrics (`tidal.bench.metrics.point_metrics`): SLO attainment and goodput (per GPU too) under all
three regimes at once (tight TTFT 300 ms / ITL 100 ms, balanced 1 s / 50 ms, relaxed 3 s / 25 ms;
a request is good when it finished, its TTFT is within the target and its P90 inter-token gap
too; `strict` variants check its worst gap instead), each request's worst stall, p99 ITL per 5-s
window, and pool sizes (polled every second from `/admin/workers` and the planner's
`tidal_planner_target_workers`).

Chat on a dummy model: the dummy Llama-3.1-8B samples from 128,256 ids, the GPU box's tokenizer
(SmolLM2) has 49,152; ids past its end would stream no text, so gaps would merge. The harness
pads a copy of the tokenizer with plain added tokens (" x1f4a0", ...) up to the model's vocabulary
(in the run folder), so every token streams text and re-tokenizes to itself in the next turn.

Each GPU invocation first records the cards' names and cuda:0's copy bandwidth and bf16 matmul rate
(`tidal.perf.ceilings.cards_and_ceilings`, in a child process) into every line it writes.

Commands for the lead (nvidia-h100-x2, in priority order; OUT is the device tool's folder):

    python3 -m benchmarks.headline --gpus 2 --arm agg --token-budget 4096 --group chat \\
        --out $OUT/headline-h100x2.jsonl --resume benchmarks/results/headline-h100x2.jsonl
    python3 -m benchmarks.headline --gpus 2 --arm disagg --split 1:1 --group chat \\
        --out $OUT/headline-h100x2.jsonl --resume benchmarks/results/headline-h100x2.jsonl
    python3 -m benchmarks.headline --gpus 2 --arm tidal --split 1:1 --group chat \\
        --out $OUT/headline-h100x2.jsonl --resume benchmarks/results/headline-h100x2.jsonl
    # then: --group square, --group trace, --group control per arm; --token-budget 2048 / 8192 for agg

(append each returned `headline-h100x2.jsonl` to benchmarks/results/headline-h100x2.jsonl before the
next call, so `--resume` skips what is done). The 4-GPU arms: `--gpus 4 --split 1:3|2:2|3:1`.

    python -m benchmarks.headline --sim --gpus 2         # simulator first: capacities and the load grid
    python -m benchmarks.headline --report benchmarks/results/headline-h100x2.jsonl --report-dir docs/img/headline
    python -m benchmarks.headline --smoke --arm tidal --out /tmp/headline-smoke.jsonl   # CPU, tiny model
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tidal.bench.headline import (GPU_FAMILIES, GPU_VOCAB, SMOKE_FAMILIES, Arm, Hardware, Schedule, deployment,
                                  done_keys, padded_tokenizer, parse_capacity, parse_split, point_estimate_s,
                                  point_line, run_point, select_points)
from tidal.bench.server import ServerProcess, checkout_env, tidal_command
from tidal.runtime.ports import free_port

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TRACE = REPO.parent / "shared" / "traces" / "mooncake_conversation_trace.jsonl"
STARTUP_TIMEOUT_S = 420


def git_commit() -> str | None:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return out.stdout.strip() or None


def run_invocation(args) -> int:
    begun = time.monotonic()
    hw = hardware(args)
    arm = Arm(args.arm, hw.gpus, split=parse_split(args.split, args.arm, hw.gpus), token_budget=args.token_budget,
              local_prefill_threshold=args.local_prefill, planner_slo=args.planner_slo)
    families = SMOKE_FAMILIES if hw.smoke else GPU_FAMILIES
    schedule = Schedule(warmup_s=args.warmup_s, measure_s=args.measure_s, grace_s=args.grace_s,
                        capacity=args.capacity, window_s=args.window_s, trace=args.trace, seed=args.seed)
    done = done_keys([args.out, *args.resume])
    todo = [p for p in select_points(args.group, args.points) if (arm.arm_id, p.point_id) not in done]
    print(f"{arm.arm_id} x {args.group}: {len(todo)} point(s) to run: {', '.join(p.point_id for p in todo) or '-'}")
    if not todo:
        return 0
    run_dir = Path(args.run_dir) / f"{arm.arm_id}-{args.group}"
    run_dir.mkdir(parents=True, exist_ok=True)
    facts = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": git_commit(),
             "host_cpus": os.cpu_count()}
    if not hw.smoke:
        from tidal.perf.ceilings import cards_and_ceilings  # torch: only on the GPU box

        facts.update(cards_and_ceilings(env=checkout_env(), cwd=str(REPO)))
        hw = dataclasses.replace(hw, tokenizer=padded_tokenizer(hw.tokenizer, GPU_VOCAB, Path(args.tokenizer_dir)))
        print("hardware:", json.dumps(facts), flush=True)
    port = free_port()
    config_path = run_dir / "deployment.yaml"
    config_path.write_text(yaml.safe_dump(deployment(arm, hw, port), sort_keys=False))
    server = ServerProcess(tidal_command(["serve", "-f", str(config_path)]), run_dir / "serve.log", port,
                           name="tidal serve")
    ran = []
    try:
        start_s = server.start_and_wait(timeout_s=STARTUP_TIMEOUT_S, num_workers=arm.gpus)
        print(f"server up in {start_s:.1f} s ({config_path})", flush=True)
        for point in todo:
            left = args.budget_s - (time.monotonic() - begun)
            if point_estimate_s(point, schedule) > left:
                break
            row = run_point(point, arm, hw, server, schedule, families)
            row.update(hardware=facts, server_start_s=start_s, deployment=str(config_path),
                       points_before_on_server=len(ran))
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
            ran.append(point)
            print(point_line(row), flush=True)
    finally:
        server.stop()
    remaining = [p.point_id for p in todo if p not in ran]
    print(f"ran {len(ran)} point(s) in {time.monotonic() - begun:.0f} s; remaining: {', '.join(remaining) or 'none'}")
    return 0


def hardware(args) -> Hardware:
    if args.smoke:
        return Hardware(smoke=True, gpus=args.gpus or 2, tokenizer=None, kv_cache_memory_gib=0.05,
                        max_model_len=2048, api_servers=args.api_servers)
    return Hardware(smoke=False, gpus=args.gpus or 2, tokenizer=args.tokenizer, kv_cache_memory_gib=args.kv_gib,
                    max_model_len=16_384, api_servers=args.api_servers)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arm", default="agg", choices=["agg", "disagg", "tidal"])
    p.add_argument("--gpus", type=int, default=None, help="GPUs (workers in --smoke); default 2")
    p.add_argument("--split", default=None, help="prefill:decode workers (disagg, tidal); default half:half")
    p.add_argument("--token-budget", type=int, default=4096, help="agg workers' (prefill workers') step budget")
    p.add_argument("--api-servers", type=int, default=None, help="serving-tier processes (default: Tidal's, one "
                                                                   "per four cores)")
    p.add_argument("--local-prefill", type=int, default=None,
                   help="tidal: local_prefill_threshold (default 512; smoke 32)")
    p.add_argument("--group", default=None, help="chat | square | trace | control (default: chat; smoke: smoke)")
    p.add_argument("--capacity", default=None, help="AGG's capacity on 2 GPUs per family, e.g. chat=1.2,long=1.5 "
                   "(arrivals/s; scaled by GPUs / 2)")
    p.add_argument("--warmup-s", type=float, default=None,
                   help="default 30 (a chat session lasts ~40 s: the population builds up in it; smoke 1)")
    p.add_argument("--measure-s", type=float, default=None, help="default 45 (smoke 4)")
    p.add_argument("--grace-s", type=float, default=None, help="after the window, then cut; default 25 (smoke 8)")
    p.add_argument("--window-s", type=float, default=5.0, help="ITL p99 over time: window length")
    p.add_argument("--budget-s", type=float, default=500.0, help="wall time for this invocation")
    p.add_argument("--planner-slo", default="balanced", choices=["tight", "balanced", "relaxed"],
                   help="tidal: the SLO regime its planner holds (relaxed = the ITL-tight 3 s / 25 ms)")
    p.add_argument("--points", default=None, help="only these point ids, comma-separated (e.g. chat-poisson-x0.75; "
                                                  "any chat-poisson-xN or chat-gammaK-xN too)")
    p.add_argument("--out", default=None, help="results JSONL (appended)")
    p.add_argument("--resume", action="append", default=[], help="results JSONL whose points are done")
    p.add_argument("--run-dir", default=None, help="deployment YAMLs and server logs (default $OUT or /tmp)")
    p.add_argument("--tokenizer", default=".gpu_assets/tokenizer")
    p.add_argument("--tokenizer-dir", default="/tmp/headline-tokenizer",
                   help="where the padded copy of --tokenizer goes (18 MB; not under $OUT)")
    p.add_argument("--kv-gib", type=float, default=40.0, help="KV cache per worker (GPU)")
    p.add_argument("--trace", default=str(DEFAULT_TRACE))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="CPU: dummy:tiny-llama, CPU workers, ~5-s points")
    p.add_argument("--sim", action="store_true", help="the arms in the fleet simulator; prints the load grid")
    p.add_argument("--families", default=None, help="--sim: chat,long,short,trace (default all)")
    p.add_argument("--profile", default=str(REPO / "benchmarks/results/profile-llama-3.1-8b-NVIDIA-H200.json"))
    p.add_argument("--report", nargs="+", default=None, metavar="JSONL", help="tables and plots from results")
    p.add_argument("--report-dir", default="docs/img/headline")
    args = p.parse_args(argv)
    if args.report:
        from tidal.bench.headline_report import write_report

        print(write_report(args.report, args.report_dir))
        return 0
    if args.sim:
        from tidal.sim.headline import run_sim

        names = (args.families or ",".join(GPU_FAMILIES)).split(",")
        return run_sim(args.gpus or 2, args.profile, args.trace, {n: GPU_FAMILIES[n] for n in names})
    smoke = args.smoke
    args.group = args.group or ("smoke" if smoke else "chat")
    args.warmup_s = args.warmup_s if args.warmup_s is not None else (1.0 if smoke else 30.0)
    args.measure_s = args.measure_s if args.measure_s is not None else (4.0 if smoke else 45.0)
    args.grace_s = args.grace_s if args.grace_s is not None else (8.0 if smoke else 25.0)
    args.capacity = parse_capacity(args.capacity, smoke)
    args.local_prefill = args.local_prefill if args.local_prefill is not None else (32 if smoke else 512)
    args.run_dir = args.run_dir or os.path.join(os.environ.get("OUT", "/tmp"), "headline-runs")
    if args.out is None:
        raise SystemExit("--out FILE is needed (results are appended to it)")
    if smoke and args.trace == str(DEFAULT_TRACE) and not os.path.exists(args.trace):
        args.trace = None
    return run_invocation(args)


if __name__ == "__main__":
    sys.exit(main())
