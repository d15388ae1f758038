"""The headline experiment's arms and workloads in the fleet simulator (`tidal.sim.fleet`), before
GPU time is spent: AGG's capacity per workload family on G GPUs, the load grid that follows, and a
preview of every arm (`python -m benchmarks.headline --sim`).

Simulated time only, step times from a `tidal profile` file. What the simulator can and cannot say:
- AGG is modelled as G decode workers and no prefill worker, so every prompt prefills on its decode
  worker, but WHOLE, in one stall of the batch: the fleet simulator has no chunked prefill. Its
  throughput (and so the capacity) is about right; its stalls are longer than a chunked-prefill
  engine's, so AGG's ITL here is pessimistic. The token budget (2k/4k/8k) is not modelled.
- DISAGG: P prefill and D decode workers, every prompt prefilled remotely while a prefill worker has
  room (`PREFILL_QUEUE_TOKENS`, as the live arms).
- TIDAL: the same start split, prompts under 512 uncached tokens prefill locally, and the planner
  core in the loop (flips only: the budget is the G GPUs; min_prefill 0 as served), with the
  profile's performance model (the served planner uses its default linear model: no profile field).
- A request meets a regime when its TTFT and its MEAN inter-token gap are within the targets (the
  simulator keeps no per-request gaps); the GPU runs judge the P90 of each request's gaps.
- Chat sessions: each turn's prompt is the history (system prompt, earlier turns and replies) plus a
  new message, and all but the new message is a prefix-cache hit (the KV-aware router keeps a session
  where its history is). The next turn arrives an exponential think time after the previous
  reply would end at 20 ms a token: the simulator has no closed loop.
- Words become tokens at 1.3 tokens a word (the bench's word list through SmolLM2's tokenizer
  plus the chat template, roughly).
"""

from __future__ import annotations

import os
import random

from tidal.bench.arrivals import make_arrivals
from tidal.bench.headline import PREFILL_QUEUE_TOKENS
from tidal.bench.metrics import SLO_REGIMES
from tidal.bench.traces import MOONCAKE_BLOCK_TOKENS, load_trace
from tidal.perf.profile import load_profile
from tidal.sim.fleet import Fleet
from tidal.sim.fleet_config import FleetConfig
from tidal.sim.fleet_worker import SimRequest
from tidal.planner.core import Planner
from tidal.planner.perf_model import PerfModel
from tidal.planner.types import SLO, PlannerConfig

TOKENS_PER_WORD = 1.3
ASSUMED_ITL_S = 0.02
KV_GIB = 40.0
KV_BYTES_PER_TOKEN = 131_072  # Llama-3.1-8B: 2 x 32 layers x 8 heads x 128 x 2 B
SIM_S = 120.0
GRID = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5)


def _fresh_ids(requests: list[SimRequest]) -> list[SimRequest]:
    requests.sort(key=lambda r: r.arrival_s)
    return [SimRequest(i, r.arrival_s, r.input_len, r.output_len, r.cached_tokens) for i, r in enumerate(requests)]


def chat_requests(rate: float, bench: dict, duration_s: float, seed: int, arrival: str = "poisson",
                  burstiness: float = 1.0, square: tuple[float, float] | None = None) -> list[SimRequest]:
    rng = random.Random(seed)
    kw = {"burst_factor": 4.0, "burst_s": square[0], "calm_s": square[1]} if square else {}
    starts = make_arrivals(arrival, rate, rng, burstiness=burstiness, **kw)
    system = round(bench["system_words"] * TOKENS_PER_WORD)
    user = round(bench["user_words"] * TOKENS_PER_WORD)
    out = []
    for start in starts:
        if start >= duration_s:
            break
        at, history = start, system
        for _ in range(bench["turns"]):
            prompt = history + user
            out.append(SimRequest(0, at, prompt, bench["output_len"], history))
            history = prompt + bench["output_len"]
            at += bench["output_len"] * ASSUMED_ITL_S + rng.expovariate(1 / bench["think_s"])
    return _fresh_ids(out)


def synthetic_requests(rate: float, bench: dict, duration_s: float, seed: int) -> list[SimRequest]:
    rng = random.Random(seed)
    spread = int(bench["input_len"] * bench["input_len_range"])
    out = []
    for at in make_arrivals("poisson", rate, rng):
        if at >= duration_s:
            break
        out.append(SimRequest(0, at, bench["input_len"] + rng.randint(-spread, spread), bench["output_len"]))
    return _fresh_ids(out)


def trace_requests(rate: float, bench: dict, duration_s: float, path: str) -> list[SimRequest]:
    """The trace at `rate` requests/s on average (its clock scaled, as the GPU run does), cut at `duration_s`;
    a prompt's leading blocks seen before are prefix hits."""
    rows = load_trace(path, max_input_len=bench["max_input_len"], max_output_len=bench["max_output_len"])
    scale = (len(rows) / max(rows[-1].time_s, 1e-9)) / rate
    seen: set[int] = set()
    out = []
    for r in rows:
        if r.time_s * scale >= duration_s:
            break
        hits = 0
        for h in r.hash_ids:
            if h not in seen:
                break
            hits += 1
        seen.update(r.hash_ids)
        out.append(SimRequest(0, r.time_s * scale, r.input_len, r.output_len,
                              min(hits * MOONCAKE_BLOCK_TOKENS, r.input_len - 1)))
    return _fresh_ids(out)


def requests_for(family, rate: float, trace: str, seed: int = 0, **shape) -> list[SimRequest]:
    if family.workload == "chat":
        return chat_requests(rate, family.bench, SIM_S, seed, **shape)
    if family.workload == "trace":
        return trace_requests(rate, family.bench, SIM_S, trace)
    return synthetic_requests(rate, family.bench, SIM_S, seed)


def run_arm(kind: str, gpus: int, split: tuple[int, int], requests: list[SimRequest], profile) -> dict:
    """One arm on a workload: attainment per regime (TTFT and mean ITL), and the planner's flips."""
    fleet = FleetConfig(token_budget=profile.prefill_knee_tokens(), kv_capacity_tokens=int(KV_GIB * 2**30)
                        // KV_BYTES_PER_TOKEN, local_prefill_tokens=512 if kind == "tidal" else 0,
                        max_prefill_queue_tokens=PREFILL_QUEUE_TOKENS, run_on_s=120.0)
    prefill, decode = (0, gpus) if kind == "agg" else split
    planner = None
    if kind == "tidal":
        slo = SLO_REGIMES["balanced"]  # as the served planner: min_prefill 0, so it may flip every worker to decode
        planner = Planner(PlannerConfig(slo=SLO(ttft_ms=slo["ttft_ms"], itl_ms=slo["itl_ms"]), max_workers=gpus,
                                        min_prefill=0, min_decode=1, reactive_interval_s=2.0,
                                        predictive_interval_s=10.0, scale_down_cooldown_s=10.0),
                          PerfModel.from_profile(profile))
    try:
        result = Fleet(fleet, profile, prefill, decode, interval_s=2.0).run(requests, planner)
    except (ValueError, ZeroDivisionError) as exc:  # a simulator failure is reported, not hidden
        return {"error": f"{type(exc).__name__}: {exc}", "flips": 0, **{name: float("nan") for name in SLO_REGIMES}}
    row = {"flips": result.actions["flip"], "unfinished": sum(r.finish_s is None for r in result.requests)}
    for name, slo in SLO_REGIMES.items():
        good = sum(_met(r, slo) for r in result.requests)
        row[name] = 100 * good / max(len(result.requests), 1)
    return row


def _met(r: SimRequest, slo: dict) -> bool:
    if r.finish_s is None or r.first_token_s is None or (r.first_token_s - r.arrival_s) * 1e3 > slo["ttft_ms"]:
        return False
    return r.output_len < 2 or (r.finish_s - r.first_token_s) * 1e3 / (r.output_len - 1) <= slo["itl_ms"]


class SimFailed(RuntimeError):
    pass


def agg_capacity(family, gpus: int, profile, trace: str) -> float:
    """The highest Poisson rate at which AGG meets the balanced SLO for >= 90% of requests: doubling, then
    bisection to 5%."""
    def ok(rate: float) -> bool:
        row = run_arm("agg", gpus, (0, gpus), requests_for(family, rate, trace), profile)
        if "error" in row:
            raise SimFailed(row["error"])
        return row["balanced"] >= 90.0

    low, high = 0.0, 0.05
    while ok(high) and high < 1e4:
        low, high = high, high * 2
    if low == 0.0:  # not even the first rate: say so (a bisection towards 0 would never end)
        raise SimFailed(f"AGG misses the balanced SLO for over 10% of requests even at {high:g} arrivals/s")
    while high - low > 0.05 * high:
        mid = (low + high) / 2
        low, high = (mid, high) if ok(mid) else (low, mid)
    return low


def run_sim(gpus: int, profile_path: str, trace: str, families: dict) -> int:
    """Prints AGG's capacity per family, every arm on the load grid, and the --capacity flag to pass."""
    profile = load_profile(profile_path)
    split = (gpus // 2, gpus - gpus // 2)
    print(f"fleet simulator, {gpus} GPUs, {profile}; {SIM_S:g} s of arrivals per run")
    print("limits: AGG prefills whole prompts (no chunking) -> its ITL is pessimistic; attainment uses each "
          "request's MEAN gap; chat turns arrive open-loop (see tidal/sim/headline.py)")
    capacities = {}
    for name, family in families.items():
        if family.workload == "trace" and not _exists(trace):
            print(f"{name}: no trace at {trace}; skipped")
            continue
        try:
            capacities[name] = agg_capacity(family, gpus, profile, trace)
        except SimFailed as exc:
            print(f"\n{name}: no AGG capacity estimate ({exc})")
            continue
        print(f"\n{name}: AGG capacity {capacities[name]:.3f} arrivals/s ({capacities[name] / gpus:.3f} per GPU)")
        print("| load | rate /s | arm | tight % | balanced % | relaxed % | flips |")
        print("|---|---|---|---|---|---|---|")
        for load in GRID:
            rate = load * capacities[name]
            requests = requests_for(family, rate, trace)
            for kind in ("agg", "disagg", "tidal"):
                row = run_arm(kind, gpus, split, [_copy(r) for r in requests], profile)
                print(f"| {load:g} | {rate:.3f} | {kind} | {row['tight']:.0f} | {row['balanced']:.0f} | "
                      f"{row['relaxed']:.0f} | {row['flips']} |" + (f" {row['error']}" if "error" in row else ""))
    if "chat" in capacities:
        _chat_shapes(families["chat"], capacities["chat"], gpus, split, profile)
    scaled = {k: v * 2 / gpus for k, v in capacities.items()}
    print("\nsuggested load grid (x AGG capacity): " + ", ".join(f"{x:g}" for x in GRID))
    print("pass to headline.py (capacity on 2 GPUs; an H100 is slower than the profile's card if that is an "
          "H200): --capacity " + ",".join(f"{k}={v:.3g}" for k, v in scaled.items()))
    return 0


def _chat_shapes(family, capacity: float, gpus: int, split, profile) -> None:
    print(f"\nchat at 1.0x ({capacity:.3f} sessions/s), burstiness and the square wave (15 s at 2x, 45 s at 0.5x):")
    print("| arrivals | arm | tight % | balanced % | relaxed % | flips |")
    print("|---|---|---|---|---|---|")
    shapes = [("gamma k=0.5", {"arrival": "gamma", "burstiness": 0.5}, capacity),
              ("gamma k=0.25", {"arrival": "gamma", "burstiness": 0.25}, capacity),
              ("square", {"arrival": "square", "square": (15.0, 45.0)}, 0.5 * capacity)]
    for label, shape, rate in shapes:
        requests = chat_requests(rate, family.bench, SIM_S * 1.5, 0, **shape)
        for kind in ("agg", "disagg", "tidal"):
            row = run_arm(kind, gpus, split, [_copy(r) for r in requests], profile)
            print(f"| {label} | {kind} | {row['tight']:.0f} | {row['balanced']:.0f} | {row['relaxed']:.0f} | "
                  f"{row['flips']} |")


def _copy(r: SimRequest) -> SimRequest:
    return SimRequest(r.request_id, r.arrival_s, r.input_len, r.output_len, r.cached_tokens)


def _exists(path: str) -> bool:
    return bool(path) and os.path.exists(path)

