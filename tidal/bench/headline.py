"""The headline experiment's parts (`python -m benchmarks.headline` runs them): arms, workloads, points.

- `Arm` (agg | disagg | tidal on G GPUs) and `Hardware` (the GPU box or the CPU smoke set-up) make
  the deployment config of one arm (`deployment`);
- `Family` is one kind of traffic (`GPU_FAMILIES`, `SMOKE_FAMILIES`), `Point` one workload at one
  rate (a multiple of AGG's capacity), `group_points`/`select_points` the points of a group;
- `run_point` runs one point against a running server (warm-up, measured window, grace, cut) and
  returns its result line: `tidal.bench.metrics.point_metrics` plus the pools the planner kept and
  the engines' summary (`tidal.bench.fleet_poller`);
- `done_keys`, `point_estimate_s`, `point_line`: resuming, budgeting and printing an invocation;
  `padded_tokenizer`: a tokenizer that streams text for every id a dummy model samples.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from tidal.bench.fleet_poller import FleetPoller, engine_summary
from tidal.bench.metrics import SLO_REGIMES, point_metrics
from tidal.bench.runner import Bench, BenchConfig
from tidal.bench.server import CHECKOUT, ServerProcess
from tidal.bench.traces import load_trace

GPU_MODEL = "dummy:llama-3.1-8b"
GPU_VOCAB = 128_256

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


PLANNER_PROFILE = CHECKOUT / "benchmarks/results/profile-llama-3.1-8b-NVIDIA-H200.json"
"""tidal on GPUs: the planner's performance model (corrected online by the step times it sees)."""
DECODE_TOKEN_BUDGET = 512
PREFILL_QUEUE_TOKENS = 32768
"""Every arm's `disaggregation.max_prefill_queue_tokens`: past it a prompt prefills on its decode worker."""
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
        # Shedding off, as before admission shed by default (issue 17): the headline's figures measure
        # how every arrival's latency meets the SLO, so its points stay comparable across commits.
        "frontend": {"host": "127.0.0.1", "port": port, "router": "kv", "max_queue": 8192, "queue_timeout_s": 120,
                     "shed_on_wait_estimate": False, "max_waiting_per_worker": 0,
                     "log_level": "warning", **({"api_servers": hw.api_servers} if hw.api_servers else {})},
        "disaggregation": {"local_prefill_threshold": arm.local_prefill_threshold if arm.kind == "tidal" else 0,
                           "max_prefill_queue_tokens": PREFILL_QUEUE_TOKENS},
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


@dataclass(frozen=True)
class Schedule:
    """How every point of an invocation runs: its windows, AGG's capacities, the trace and the seed."""
    warmup_s: float
    """Requests scheduled in it are not counted."""
    measure_s: float
    grace_s: float
    """After the window: requests still running then are cut (counted as misses)."""
    capacity: dict[str, float]
    """AGG's capacity per family on 2 GPUs (arrivals/s; scaled by GPUs / 2), on the smoke workers as they are."""
    window_s: float = 5.0
    """ITL p99 over time: the window's length."""
    trace: str | None = None
    seed: int = 0


def bench_config(point: Point, family: Family, rate: float, url: str,
                 schedule: Schedule) -> tuple[BenchConfig, float]:
    """The bench run of a point and its measured window's length."""
    measure_s = schedule.measure_s
    kw = dict(family.bench)
    if point.arrival == "square":
        burst_s, calm_s, periods = point.square
        measure_s = (burst_s + calm_s) * periods
        kw.update(arrival="square", burst_factor=4.0, burst_s=burst_s, calm_s=calm_s)
    else:
        kw.update(arrival=point.arrival, burstiness=point.burstiness)
    warmup_s = 0.0 if point.arrival == "square" else schedule.warmup_s
    if family.workload == "trace":
        kw.update(trace=schedule.trace, time_scale=trace_time_scale(schedule.trace, rate))
    config = BenchConfig(url=url, workload=family.workload, rate=rate, seed=schedule.seed, sessions=10**9, requests=10**9,
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


def run_point(point: Point, arm: Arm, hw: Hardware, server: ServerProcess, schedule: Schedule,
              families: dict) -> dict:
    """One point against the running `server`: its result line (what `point_line` prints)."""
    family = families[point.family]
    capacity = schedule.capacity[point.family] * arm.gpus / 2 if not hw.smoke else schedule.capacity[point.family]
    rate = point.load * capacity
    config, warmup_s = bench_config(point, family, rate, server.url, schedule)
    measure_s = config.duration_s - warmup_s
    wall = time.monotonic()
    with FleetPoller(server.url, frontend_pid=server.pid) as poller:
        records, start, cut = asyncio.run(_bench_with_cut(config, config.duration_s + schedule.grace_s))
    wall_s = time.monotonic() - wall
    server.wait_idle()
    pools = [{"t": round(s["t"] - start, 2), "workers": s["workers"], "targets": s["targets"]}
             for s in poller.samples]
    engines = engine_summary([{**s, "t": s["t"] - start} for s in poller.samples], warmup_s, warmup_s + measure_s)
    metrics = point_metrics(records, warmup_s, measure_s, gpus=arm.gpus, window_s=schedule.window_s)
    bench_fields = {k: v for k, v in dataclasses.asdict(config).items() if k in family.bench or k in (
        "arrival", "burstiness", "burst_factor", "burst_s", "calm_s", "time_scale", "trace")}
    return {"arm": arm.arm_id, "arm_kind": arm.kind, "gpus": arm.gpus, "split": list(arm.split),
            "token_budget": arm.token_budget, "planner": arm.planner,
            "local_prefill_threshold": arm.local_prefill_threshold if arm.kind == "tidal" else 0,
            "group": point.group, "point": point.point_id, "family": point.family, "workload": family.workload,
            "load": point.load, "capacity": capacity, "rate": rate, "warmup_s": warmup_s, "measure_s": measure_s,
            "grace_s": schedule.grace_s, "cut_by_grace": cut, "bench": bench_fields, "wall_s": wall_s,
            "pools": pools, "engines": engines, **metrics}


# ---- an invocation's bookkeeping ----------------------------------------------------------------------------------------
def done_keys(paths: list[str]) -> set[tuple[str, str]]:
    """(arm, point) of every result line in `paths` (missing files are skipped)."""
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


def point_estimate_s(point: Point, schedule: Schedule) -> float:
    """About how long a point takes, so an invocation stops before its wall-time budget runs out."""
    if point.arrival == "square":
        burst_s, calm_s, periods = point.square
        return (burst_s + calm_s) * periods + schedule.grace_s / 2 + 10
    return schedule.warmup_s + schedule.measure_s + schedule.grace_s / 2 + 10


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

