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
import asyncio
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tidal.bench.fleet_poller import FleetPoller, engine_summary
from tidal.bench.metrics import SLO_REGIMES, point_metrics
from tidal.bench.runner import Bench, BenchConfig
from tidal.bench.server import ServerProcess, checkout_env, free_port, tidal_command
from tidal.bench.traces import load_trace

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TRACE = REPO.parent / "shared" / "traces" / "mooncake_conversation_trace.jsonl"
GPU_MODEL = "dummy:llama-3.1-8b"
GPU_VOCAB = 128_256
STARTUP_TIMEOUT_S = 420


# ---- hardware and arms ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Hardware:
    """What the workers run on: the GPU box (8B dummy, bf16, cuda_ipc) or the CPU smoke set-up."""
    smoke: bool
    gpus: int
    """GPUs, or CPU workers standing in for them in smoke mode."""
    tokenizer: str | None
    kv_cache_memory_gib: float
    max_model_len: int
    api_servers: int | None = None
    """The serving tier's processes (`frontend.api_servers`); None: Tidal's default for the host."""

    @property
    def devices(self) -> list[str] | None:
        return None if self.smoke else [f"cuda:{i}" for i in range(self.gpus)]


@dataclass(frozen=True)
class Arm:
    kind: str
    """agg | disagg | tidal"""
    gpus: int
    split: tuple[int, int] = (0, 0)
    """(prefill, decode) workers; agg: unused (every GPU role both)."""
    token_budget: int = 4096
    """agg: each worker's chunked-prefill budget; disagg/tidal: the prefill workers'."""
    local_prefill_threshold: int = 512
    """tidal: prompts with fewer uncached tokens prefill on their decode worker."""
    planner_slo: str = "balanced"
    """tidal: the SLO regime (`tidal.bench.metrics.SLO_REGIMES`) the planner holds."""

    @property
    def arm_id(self) -> str:
        if self.kind == "agg":
            return f"agg-g{self.gpus}-tb{self.token_budget}"
        suffix = f"-slo-{self.planner_slo}" if self.planner and self.planner_slo != "balanced" else ""
        return f"{self.kind}-g{self.gpus}-{self.split[0]}p{self.split[1]}d{suffix}"

    @property
    def planner(self) -> bool:
        return self.kind == "tidal"


PLANNER_PROFILE = REPO / "benchmarks/results/profile-llama-3.1-8b-NVIDIA-H200.json"
"""tidal on GPUs: the planner's performance model (corrected online by the step times it sees)."""
DECODE_TOKEN_BUDGET = 512
"""Decode workers (disagg, tidal): a step carries the decodes plus local prefill chunks of this size."""


def deployment(arm: Arm, hw: Hardware, port: int) -> dict:
    """The deployment config (`tidal serve -f`) of one arm on this hardware."""
    devices = hw.devices
    engine = {"kv_cache_memory_gib": hw.kv_cache_memory_gib, "max_model_len": hw.max_model_len,
              "max_num_seqs": 256 if not hw.smoke else 32, "token_budget": arm.token_budget}
    if not hw.smoke:
        engine["dtype"] = "bfloat16"
    extra = {"num_threads": 1} if hw.smoke else {}
    if arm.kind == "agg":
        workers = [{"role": "both", "count": arm.gpus, **({"devices": devices} if devices else {}), **extra}]
    else:
        prefill, decode = arm.split
        if prefill + decode != arm.gpus or decode < 1:
            raise SystemExit(f"--split {prefill}:{decode} does not fill {arm.gpus} GPUs with a decode worker")
        workers = []
        if prefill:
            workers.append({"role": "prefill", "count": prefill, **({"devices": devices[:prefill]} if devices else {}),
                            "engine": {"token_budget": arm.token_budget}, **extra})
        workers.append({"role": "decode", "count": decode, **({"devices": devices[prefill:]} if devices else {}),
                        "engine": {"token_budget": DECODE_TOKEN_BUDGET}, **extra})
    config = {
        "model": "dummy:tiny-llama" if hw.smoke else GPU_MODEL,
        "tokenizer": hw.tokenizer,
        "frontend": {"host": "127.0.0.1", "port": port, "router": "kv", "max_queue": 8192, "queue_timeout_s": 120,
                     "log_level": "warning", **({"api_servers": hw.api_servers} if hw.api_servers else {})},
        "disaggregation": {"local_prefill_threshold": arm.local_prefill_threshold if arm.kind == "tidal" else 0,
                           "max_prefill_queue_tokens": 32768},
        "kv_transfer": {"backend": "auto" if hw.smoke else "cuda_ipc"},
        "engine": engine,
        "workers": workers,
    }
    if arm.planner:
        config["planner"] = {
            "slo": dict(SLO_REGIMES[arm.planner_slo]), "max_workers": arm.gpus, "min_prefill": 0, "min_decode": 1,
            "reactive_interval_s": 1.0 if hw.smoke else 2.0, "predictive_interval_s": 10.0, "predictor": "seasonal",
            "headroom": 0.15, "worker_startup_s": 60.0, "scale_down_cooldown_s": 10.0, "allow_flips": True,
            "devices": devices or [], "actuator": "local"}
        if not hw.smoke and PLANNER_PROFILE.exists():
            config["planner"]["profile"] = str(PLANNER_PROFILE)  # the measured step times (H200 Llama-3.1-8B)
    return config


# ---- workloads and points ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Family:
    """One kind of traffic: a bench workload and its shape; `capacity` keys are family names."""
    name: str
    workload: str
    """chat | synthetic | trace (tidal bench)"""
    bench: dict = field(default_factory=dict)
    """BenchConfig fields."""


GPU_FAMILIES = {
    "chat": Family("chat", "chat", {"turns": 6, "think_s": 2.0, "system_words": 600, "user_words": 80,
                                    "output_len": 150}),
    "long": Family("long", "synthetic", {"input_len": 6000, "input_len_range": 0.33, "output_len": 225,
                                         "vocab_size": 49_000}),
    "short": Family("short", "synthetic", {"input_len": 256, "input_len_range": 0.5, "output_len": 128,
                                           "vocab_size": 49_000}),
    "trace": Family("trace", "trace", {"max_input_len": 12_288, "max_output_len": 512, "vocab_size": 49_000}),
}
SMOKE_FAMILIES = {
    "chat": Family("chat", "chat", {"turns": 2, "think_s": 0.3, "system_words": 30, "user_words": 8,
                                    "output_len": 8}),
    "long": Family("long", "synthetic", {"input_len": 600, "input_len_range": 0.3, "output_len": 8,
                                         "vocab_size": 49_000}),
    "short": Family("short", "synthetic", {"input_len": 32, "input_len_range": 0.5, "output_len": 8,
                                           "vocab_size": 49_000}),
    "trace": Family("trace", "trace", {"max_input_len": 1024, "max_output_len": 8, "vocab_size": 49_000}),
}
# AGG's capacity per family on 2 GPUs (arrivals/s: chat sessions, else requests), at >= 90% attainment of
# the balanced SLO. First guesses: `--sim` on the H200 profile (2026-11-27: chat 14.8, long 7.6, short 250;
# the trace crashed the simulator) x 0.7 for an H100's lower bandwidth, and a guess for the trace.
# Replace them with the measured capacity once the chat grid has run (`--capacity chat=X`).
GPU_CAPACITY_2 = {"chat": 10.0, "long": 5.0, "short": 170.0, "trace": 1.5}
SMOKE_CAPACITY = {"chat": 1.5, "long": 0.3, "short": 1.0, "trace": 0.3}


@dataclass(frozen=True)
class Point:
    group: str
    family: str
    load: float
    """Offered rate as a multiple of AGG's capacity for the family."""
    arrival: str = "poisson"
    """poisson | gamma | square | replay (the trace's own clock, scaled to the rate)"""
    burstiness: float = 1.0
    square: tuple[float, float, int] | None = None
    """(burst_s, calm_s, periods): 2x for burst_s, 0.5x for calm_s; `load` is then the calm multiple."""

    @property
    def point_id(self) -> str:
        shape = {"poisson": "poisson", "replay": "replay", "gamma": f"gamma{self.burstiness:g}",
                 "square": "square" + ("" if self.square is None else f"{self.square[0]:g}-{self.square[1]:g}")}
        return f"{self.family}-{shape[self.arrival]}-x{self.load:g}"


def group_points(group: str) -> list[Point]:
    if group == "chat":
        first = [Point("chat", "chat", 1.0), Point("chat", "chat", 1.0, "gamma", 0.25),
                 Point("chat", "chat", 0.5), Point("chat", "chat", 1.5), Point("chat", "chat", 1.0, "gamma", 0.5)]
        return first + [Point("chat", "chat", x) for x in (0.25, 0.75, 1.25)]
    if group == "square":
        return [Point("square", "chat", 0.5, "square", square=(15.0, 45.0, 3))]
    if group == "trace":
        return [Point("trace", "trace", x, "replay") for x in (1.0, 0.5)]
    if group == "control":
        return [Point("control", f, x) for x in (1.0, 0.5) for f in ("long", "short")]
    if group == "smoke":
        return [Point("smoke", "chat", 1.0)]
    raise SystemExit(f"unknown group {group!r}: chat, square, trace, control (smoke in --smoke mode)")


def select_points(group: str, ids: str | None) -> list[Point]:
    """The group's points (`ids`: only those, in the group's order), plus any chat Poisson or gamma
    point named by id that the group lacks (`chat-poisson-x0.875`, `chat-gamma0.5-x1.25`: a finer grid)."""
    points = group_points(group)
    if not ids:
        return points
    wanted = [i for i in ids.split(",") if i]
    chosen = [p for p in points if p.point_id in wanted]
    known = {p.point_id for p in chosen}
    for point_id in wanted:
        if point_id in known:
            continue
        match = re.fullmatch(r"chat-(poisson|gamma([0-9.]+))-x([0-9.]+)", point_id)
        if match is None:
            raise SystemExit(f"unknown point {point_id!r} for group {group!r}")
        shape, k, load = match.groups()
        point = Point(group, "chat", float(load), "poisson" if shape == "poisson" else "gamma",
                      1.0 if k is None else float(k))
        if point.point_id != point_id:
            raise SystemExit(f"write point {point_id!r} as {point.point_id!r}")
        chosen.append(point)
    return chosen


def trace_time_scale(path: str, rate: float) -> float:
    """The clock factor that replays the trace at `rate` requests/s on average."""
    rows = load_trace(path)
    span = max(rows[-1].time_s - rows[0].time_s, 1e-9)
    return (len(rows) / span) / rate


def bench_config(point: Point, family: Family, rate: float, url: str, seed: int, args) -> tuple[BenchConfig, float]:
    """The bench run of a point and its measured window's length."""
    measure_s = args.measure_s
    kw = dict(family.bench)
    if point.arrival == "square":
        burst_s, calm_s, periods = point.square
        measure_s = (burst_s + calm_s) * periods
        kw.update(arrival="square", burst_factor=4.0, burst_s=burst_s, calm_s=calm_s)
    else:
        kw.update(arrival=point.arrival, burstiness=point.burstiness)
    warmup_s = 0.0 if point.arrival == "square" else args.warmup_s
    if family.workload == "trace":
        kw.update(trace=args.trace, time_scale=trace_time_scale(args.trace, rate))
    config = BenchConfig(url=url, workload=family.workload, rate=rate, seed=seed, sessions=10**9, requests=10**9,
                         duration_s=warmup_s + measure_s, timeout_s=600.0, **kw)
    return config, warmup_s


# ---- one point ----------------------------------------------------------------------------------------
async def _bench_with_cut(config: BenchConfig, stop_after_s: float) -> tuple[list, float, bool]:
    """Runs the bench; cancels what still runs `stop_after_s` after the start. (records, start, cut?)"""
    bench = Bench(config)
    task = asyncio.create_task(bench.run())
    done, _ = await asyncio.wait({task}, timeout=stop_after_s)
    if not done:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    elif task.exception() is not None:
        raise task.exception()
    return bench.records, bench.start, not done


def run_point(point: Point, arm: Arm, hw: Hardware, server: ServerProcess, args, families: dict) -> dict:
    family = families[point.family]
    capacity = args.capacity[point.family] * arm.gpus / 2 if not hw.smoke else args.capacity[point.family]
    rate = point.load * capacity
    config, warmup_s = bench_config(point, family, rate, server.url, args.seed, args)
    measure_s = config.duration_s - warmup_s
    wall = time.monotonic()
    with FleetPoller(server.url, frontend_pid=server.pid) as poller:
        records, start, cut = asyncio.run(_bench_with_cut(config, config.duration_s + args.grace_s))
    wall_s = time.monotonic() - wall
    server.wait_idle()
    pools = [{"t": round(s["t"] - start, 2), "workers": s["workers"], "targets": s["targets"]}
             for s in poller.samples]
    engines = engine_summary([{**s, "t": s["t"] - start} for s in poller.samples], warmup_s, warmup_s + measure_s)
    metrics = point_metrics(records, warmup_s, measure_s, gpus=arm.gpus, window_s=args.window_s)
    bench_fields = {k: v for k, v in dataclasses.asdict(config).items() if k in family.bench or k in (
        "arrival", "burstiness", "burst_factor", "burst_s", "calm_s", "time_scale", "trace")}
    return {"arm": arm.arm_id, "arm_kind": arm.kind, "gpus": arm.gpus, "split": list(arm.split),
            "token_budget": arm.token_budget, "planner": arm.planner,
            "local_prefill_threshold": arm.local_prefill_threshold if arm.kind == "tidal" else 0,
            "group": point.group, "point": point.point_id, "family": point.family, "workload": family.workload,
            "load": point.load, "capacity": capacity, "rate": rate, "warmup_s": warmup_s, "measure_s": measure_s,
            "grace_s": args.grace_s, "cut_by_grace": cut, "bench": bench_fields, "wall_s": wall_s,
            "pools": pools, "engines": engines, **metrics}


# ---- one invocation ----------------------------------------------------------------------------------------
def done_keys(paths: list[str]) -> set[tuple[str, str]]:
    keys = set()
    for path in paths:
        if path and os.path.exists(path):
            for line in Path(path).read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    if "point" in row:
                        keys.add((row["arm"], row["point"]))
    return keys


def padded_tokenizer(source: str | None, vocab: int, folder: Path) -> str:
    """A copy of `source` with plain added tokens up to `vocab` ids, so every id a dummy model samples
    streams text (see the module docstring)."""
    from tokenizers import AddedToken

    from tidal.tokenizer import load_tokenizer

    if (folder / "tokenizer.json").exists():
        return str(folder)
    tokenizer = load_tokenizer(None, source)
    have = tokenizer.backend.get_vocab_size(with_added_tokens=True)
    tokenizer.backend.add_tokens([AddedToken(f" x{i:x}", special=False, normalized=False)
                                  for i in range(have, vocab)])
    tokenizer.save(str(folder))
    return str(folder)


def point_estimate_s(point: Point, args) -> float:
    if point.arrival == "square":
        burst_s, calm_s, periods = point.square
        return (burst_s + calm_s) * periods + args.grace_s / 2 + 10
    return args.warmup_s + args.measure_s + args.grace_s / 2 + 10


def git_commit() -> str | None:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return out.stdout.strip() or None


def run_invocation(args) -> int:
    begun = time.monotonic()
    hw = hardware(args)
    arm = Arm(args.arm, hw.gpus, split=parse_split(args.split, args.arm, hw.gpus), token_budget=args.token_budget,
              local_prefill_threshold=args.local_prefill, planner_slo=args.planner_slo)
    families = SMOKE_FAMILIES if hw.smoke else GPU_FAMILIES
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
            if point_estimate_s(point, args) > left:
                break
            row = run_point(point, arm, hw, server, args, families)
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


def point_line(row: dict) -> str:
    regimes = " ".join(f"{name} {r['attainment_pct']:.0f}%/{r['goodput_per_gpu']:.2f}"
                       for name, r in row["regimes"].items())
    return (f"{row['arm']} {row['point']}: rate {row['rate']:.2f}/s, {row['requests']} req ({row['unfinished']} cut, "
            f"{row['errors']} err); attainment/goodput per GPU: {regimes}; worst stall p99 "
            f"{row['worst_stall_ms']['p99'] or 0:.0f} ms")


def parse_split(text: str | None, kind: str, gpus: int) -> tuple[int, int]:
    if kind == "agg":
        return (0, gpus)
    if text is None:
        return (gpus // 2, gpus - gpus // 2)
    prefill, _, decode = text.partition(":")
    return int(prefill), int(decode)


def parse_capacity(text: str | None, smoke: bool) -> dict[str, float]:
    capacity = dict(SMOKE_CAPACITY if smoke else GPU_CAPACITY_2)
    for part in filter(None, (text or "").split(",")):
        name, _, value = part.partition("=")
        if name not in capacity:
            raise SystemExit(f"--capacity: unknown family {name!r} ({', '.join(capacity)})")
        capacity[name] = float(value)
    return capacity


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
        from benchmarks.headline_report import write_report

        print(write_report(args.report, args.report_dir))
        return 0
    if args.sim:
        from benchmarks.headline_sim import run_sim

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
