"""Routing decisions as pure functions of the candidates' state: no sockets, no clocks.

`WorkerView` is what the router knows of one worker when it decides: its role, the requests the
router has open on it, the prefill tokens it sent there that have not produced a token yet, the
prompt blocks it holds (from the prefix index), and its last load report.

- `choose_worker` picks where a request runs (aggregated) or decodes, by policy; `kv_cost` is
  the kv policy's cost.
- `choose_prefill_worker` picks the prefill worker with the least prefill work still to do,
  counting this prompt's uncached part on each (so prefix overlap is credited).
- `decide_prefill` is conditional disaggregation: remote only when the uncached prompt is long
  enough and some prefill worker has room in its queue.
- `session_worker` is session affinity: a conversation's next turn goes to the worker its session
  is pinned to, unless that worker is gone or over its pending-prefill limit.
"""

from __future__ import annotations

import math
import random
import typing
from dataclasses import dataclass
from typing import Annotated, Literal

from annotated_types import Le

from tidal.config import NonNegative, Positive, validate_fields
from tidal.protocol import Role

RoutingPolicy = Literal["round_robin", "random", "least_loaded", "kv"]
POLICIES: tuple[str, ...] = typing.get_args(RoutingPolicy)


@dataclass
class WorkerView:
    worker_id: str
    role: Role
    open_requests: int = 0  # requests the router has running there
    pending_prefill_tokens: int = 0  # prompt tokens sent there without a token back yet
    overlap_blocks: int = 0  # leading blocks of this prompt it holds (KV index)
    active_blocks: int = 0  # KV blocks its running requests hold (decode load)
    kv_usage: float = 0.0  # used / total blocks, from its last load report


MAX_OVERLAP_WEIGHT = 1000.0
"""Past this the decode load no longer counts against the prefill work at all."""
MAX_KV_TEMPERATURE = 100.0
"""Costs are sampled normalised to [0, 1]: at this temperature the choice is already uniform."""


@dataclass(frozen=True)
class KVWeights:
    overlap_weight: Annotated[float, NonNegative, Le(MAX_OVERLAP_WEIGHT)] = 1.0
    """Weight of the prefill work (in blocks) against the decode load (in blocks)."""
    temperature: Annotated[float, NonNegative, Le(MAX_KV_TEMPERATURE)] = 0.0
    """0: the cheapest worker (ties: fewest open requests, then at random); > 0: softmax sampling."""

    def __post_init__(self) -> None:
        validate_fields(self)


@dataclass(frozen=True)
class DisaggPolicy:
    local_prefill_threshold: Annotated[int, NonNegative] = 512
    """Uncached prompt tokens below which the decode worker prefills locally."""
    max_prefill_queue_tokens: Annotated[int, Positive] = 16384
    """A prefill worker with this many pending prefill tokens is full; all full -> local."""

    def __post_init__(self) -> None:
        validate_fields(self)


def kv_cost(w: WorkerView, num_prompt_tokens: int, block_size: int, overlap_weight: float) -> float:
    """overlap_weight x (prefill blocks still to compute there, this prompt's uncached part
    included) + decode blocks active there.

    Example: block_size 16, a 1024-token prompt, weight 1. Worker A holds 60 of its 64 blocks, has
    128 pending prefill tokens and 200 active blocks: 1 x (128 + 64) / 16 + 200 = 212. Worker B
    holds none, no pending prefill, 150 active blocks: 1 x 1024 / 16 + 150 = 214. A wins by 2.
    """
    uncached = max(num_prompt_tokens - w.overlap_blocks * block_size, 0)
    return overlap_weight * (w.pending_prefill_tokens + uncached) / block_size + w.active_blocks


def _argmin(candidates: list[WorkerView], key, rng: random.Random) -> WorkerView:
    """The candidate with the smallest key; ties go to the fewest open requests, then at random."""
    keys = [(key(w), w.open_requests) for w in candidates]
    best = min(keys)
    tied = [w for w, k in zip(candidates, keys) if k == best]
    return tied[0] if len(tied) == 1 else rng.choice(tied)


def choose_worker(candidates: list[WorkerView], policy: str, num_prompt_tokens: int, block_size: int,
                  counter: int, rng: random.Random, weights: KVWeights = KVWeights()) -> WorkerView:
    """The worker for a request among `candidates` (non-empty)."""
    if policy == "round_robin":
        return candidates[counter % len(candidates)]
    if policy == "random":
        return rng.choice(candidates)
    if policy == "least_loaded":
        return _argmin(candidates, lambda w: (w.open_requests, w.active_blocks), rng)
    if policy == "kv":
        def cost(w: WorkerView) -> float:
            c = kv_cost(w, num_prompt_tokens, block_size, weights.overlap_weight)
            return math.inf if math.isnan(c) else c  # NaN would compare as neither more nor less
        if not weights.temperature > 0:
            return _argmin(candidates, cost, rng)
        return _sample_by_cost(candidates, [cost(w) for w in candidates], weights.temperature, rng)
    raise ValueError(f"unknown routing policy {policy!r}; choose one of {', '.join(POLICIES)}")


def _sample_by_cost(candidates: list[WorkerView], costs: list[float], temperature: float,
                    rng: random.Random) -> WorkerView:
    """Softmax sampling over the costs normalised to [0, 1] (so the temperature is unitless), each
    weight taken relative to the cheapest: the cheapest weighs 1, the others exp(-(c - best) / scale / T)
    in [0, 1], so no temperature or cost overflows (a tiny T leaves the cheapest alone). Costs or a
    temperature that are not finite fall back to the cheapest worker."""
    if not math.isfinite(temperature) or not all(math.isfinite(c) for c in costs):
        cost_of = {id(w): c for w, c in zip(candidates, costs)}
        return _argmin(candidates, lambda w: cost_of[id(w)], rng)
    best = min(costs)
    scale = max(abs(c) for c in costs) or 1.0
    weights = [math.exp((best - c) / scale / temperature) for c in costs]
    return rng.choices(candidates, weights=weights)[0]


def choose_prefill_worker(candidates: list[WorkerView], num_prompt_tokens: int, block_size: int,
                          rng: random.Random) -> WorkerView:
    """Least prefill work there once this prompt's uncached part is added (overlap credited)."""
    return _argmin(candidates, lambda w: w.pending_prefill_tokens + max(
        num_prompt_tokens - w.overlap_blocks * block_size, 0), rng)


def decide_prefill(uncached_tokens: int, prefill_workers: list[WorkerView], policy: DisaggPolicy) -> str:
    """`local` or `remote`."""
    if not prefill_workers or uncached_tokens < policy.local_prefill_threshold:
        return "local"
    if all(w.pending_prefill_tokens >= policy.max_prefill_queue_tokens for w in prefill_workers):
        return "local"
    return "remote"


def session_worker(candidates: list[WorkerView], pinned_worker_id: str | None,
                   max_pending_prefill_tokens: int) -> WorkerView | None:
    """The candidate a session is pinned to, unless it is not among them (gone, draining) or has
    `max_pending_prefill_tokens` or more waiting; None: choose by policy."""
    view = next((v for v in candidates if v.worker_id == pinned_worker_id), None) if pinned_worker_id else None
    if view is None or view.pending_prefill_tokens >= max_pending_prefill_tokens:
        return None
    return view
