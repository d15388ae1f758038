"""Workloads for the fleet simulator, and the capacity arithmetic that scales them to a fleet.

A workload is a list of `SimRequest`s (arrival time, prompt and output lengths, prefix-cached
tokens), seeded so a run replays exactly:

- `square`: Poisson arrivals whose rate alternates calm (0.5 x the reference capacity) and burst
  (2 x), calm first, for whole periods;
- `poisson`: a constant rate;
- `trace`: a Mooncake JSONL trace, its clock compressed so the hour fits `duration_s`, and as many
  copies overlaid (each shifted by under a second, so the trace's bursts stay in step, with its own
  prefix-hash space) as it takes to reach the target mean rate. Prefix hits come from the trace's `hash_ids`: the leading blocks
  seen within `cache_ttl_s` (a fleet-wide cache: the ideal KV-aware router).

Lengths for square and poisson: uniform within +- `length_spread` of the means; a fixed share of
each prompt hits the prefix cache (multi-turn history).

Capacity: `worker_rates` says how many requests per second one prefill and one decode worker
sustain for given mean lengths under the ITL target (from the step-time model); a fleet of W
workers split in the best ratio carries W / (1/p + 1/d) requests/s at full utilisation.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

from tidal.bench.arrivals import thinned
from tidal.bench.traces import MOONCAKE_BLOCK_TOKENS, load_trace
from tidal.sim.fleet_config import FleetConfig
from tidal.sim.fleet_worker import SimRequest
from tidal.sim.timing import StepTimeModel

DEFAULT_TRACE = Path(__file__).resolve().parents[2].parent / "shared" / "traces" / "mooncake_conversation_trace.jsonl"


@dataclass(frozen=True)
class Lengths:
    isl_mean: int = 2048
    osl_mean: int = 256
    length_spread: float = 0.5
    """Lengths are uniform in mean x (1 +- spread)."""
    prefix_hit: float = 0.3
    """Share of each prompt found in the prefix cache."""


@dataclass(frozen=True)
class WorkerRates:
    prefill_rps: float
    """Requests per second one prefill worker prefills at its token budget."""
    decode_rps: float
    """Requests per second one decode worker finishes at the largest batch within the ITL target."""
    decode_batch: int

    def fleet_rps(self, workers: float) -> float:
        return workers / (1 / self.prefill_rps + 1 / self.decode_rps)

    def split(self, rate: float, utilisation: float) -> tuple[int, int]:
        """Workers each pool needs for `rate` at `utilisation` (at least one each)."""
        return (max(1, math.ceil(rate / (self.prefill_rps * utilisation))),
                max(1, math.ceil(rate / (self.decode_rps * utilisation))))


def worker_rates(model: StepTimeModel, config: FleetConfig, isl: float, osl: float, cached: float,
                 itl_ms: float) -> WorkerRates:
    budget = config.token_budget
    prefill_tokens_per_s = budget / model.step_s(budget, 0, 0)
    uncached = max(isl - cached, 1.0)
    context = isl + osl / 2
    kv_batch = max(1, int(config.kv_capacity_tokens // (isl + osl)))
    batch = 1
    cap = min(config.max_decode_batch, kv_batch)
    while batch < cap and model.step_s(0, batch + 1, int((batch + 1) * context)) * 1000 <= itl_ms:
        batch += 1
    decode_tokens_per_s = batch / model.step_s(0, batch, int(batch * context))
    return WorkerRates(prefill_tokens_per_s / uncached, decode_tokens_per_s / max(osl - 1, 1.0), batch)


def _lengths(rng: random.Random, lengths: Lengths) -> tuple[int, int, int]:
    spread = lengths.length_spread
    isl = max(1, round(lengths.isl_mean * rng.uniform(1 - spread, 1 + spread)))
    osl = max(1, round(lengths.osl_mean * rng.uniform(1 - spread, 1 + spread)))
    return isl, osl, int(isl * lengths.prefix_hit)


def square_wave(calm_rps: float, burst_rps: float, calm_s: float, burst_s: float, periods: int,
                lengths: Lengths, seed: int = 0) -> list[SimRequest]:
    period = calm_s + burst_s

    def rate(t: float) -> float:
        return calm_rps if (t % period) < calm_s else burst_rps
    return _from_rate(rate, max(calm_rps, burst_rps), period * periods, lengths, seed)


def poisson(rate_rps: float, duration_s: float, lengths: Lengths, seed: int = 0) -> list[SimRequest]:
    return _from_rate(lambda t: rate_rps, rate_rps, duration_s, lengths, seed)


def _from_rate(rate_fn, max_rate: float, duration_s: float, lengths: Lengths, seed: int) -> list[SimRequest]:
    rng = random.Random(seed)
    out = []
    for t in thinned(rate_fn, max_rate, rng):
        if t >= duration_s:
            break
        isl, osl, cached = _lengths(rng, lengths)
        out.append(SimRequest(len(out), t, isl, osl, cached))
    return out


def in_burst(time_s: float, calm_s: float, burst_s: float) -> bool:
    return (time_s % (calm_s + burst_s)) >= calm_s


@dataclass(frozen=True)
class TraceShape:
    requests: int
    duration_s: float
    isl_mean: float
    osl_mean: float
    hit_mean: float


def trace_workload(path: str | Path, duration_s: float, rate_rps: float, cache_ttl_s: float = 300.0,
                   seed: int = 0) -> list[SimRequest]:
    """The trace compressed into `duration_s`, overlaid `copies` times to reach `rate_rps` on average."""
    rows = load_trace(path, fmt="mooncake")
    span = max(rows[-1].time_s, 1e-9)
    scale = duration_s / span
    copies = max(1, round(rate_rps * duration_s / len(rows)))
    rng = random.Random(seed)
    merged = []
    hash_stride = 1 + max((h for r in rows for h in r.hash_ids), default=0)
    for copy in range(copies):
        shift = rng.uniform(0, 1.0) if copy else 0.0  # small: the copies keep the trace's bursts in step
        for r in rows:
            t = (r.time_s * scale + shift) % duration_s
            merged.append((t, r.input_len, r.output_len, tuple(h + copy * hash_stride for h in r.hash_ids)))
    merged.sort(key=lambda x: x[0])
    seen: dict[int, float] = {}
    out = []
    for t, isl, osl, hashes in merged:
        hit_blocks = 0
        for h in hashes:
            if t - seen.get(h, -math.inf) > cache_ttl_s:
                break
            hit_blocks += 1
        for h in hashes:
            seen[h] = t
        cached = min(hit_blocks * MOONCAKE_BLOCK_TOKENS, isl - 1)
        out.append(SimRequest(len(out), t, isl, osl, cached))
    return out


def shape_of(requests: list[SimRequest]) -> TraceShape:
    n = max(len(requests), 1)
    return TraceShape(len(requests), requests[-1].arrival_s if requests else 0.0,
                      sum(r.input_len for r in requests) / n, sum(r.output_len for r in requests) / n,
                      sum(r.cached_tokens for r in requests) / n)
