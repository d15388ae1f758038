"""Routing decisions as pure functions of the candidates' state: no sockets, no clocks.

`WorkerView` is what the router knows of one worker when it decides: its role, the requests the
router has open on it, the prefill tokens it sent there that have not produced a token yet, the
prompt blocks it holds (from the prefix index), and its last load report.

- `choose_worker` picks where a request runs (aggregated) or decodes, by policy.
- `choose_prefill_worker` picks the prefill worker with the least prefill work still to do,
  counting this prompt's uncached part on each (so prefix overlap is credited).
- `decide_prefill` is conditional disaggregation: remote only when the uncached prompt is long
  enough and some prefill worker has room in its queue.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

POLICIES = ("round_robin", "random", "least_loaded", "kv")


@dataclass
class WorkerView:
    worker_id: str
    role: str
    open_requests: int = 0
    pending_prefill_tokens: int = 0  # the router's count: sent, no token back yet
    overlap_blocks: int = 0  # leading prompt blocks it holds
    kv_usage: float = 0.0  # used / total blocks, from its last load report
    reported_waiting: int = 0


@dataclass(frozen=True)
class DisaggPolicy:
    local_prefill_threshold: int = 512
    """Uncached prompt tokens below which the decode worker prefills locally."""
    max_prefill_queue_tokens: int = 16384
    """A prefill worker with this many pending prefill tokens is full; all full -> local."""


def _argmin(candidates: list[WorkerView], key, counter: int) -> WorkerView:
    """The candidate with the smallest key; ties taken in turn (so bursts spread out)."""
    keys = [key(w) for w in candidates]
    best = min(keys)
    tied = [w for w, k in zip(candidates, keys) if k == best]
    return tied[counter % len(tied)]


def choose_worker(candidates: list[WorkerView], policy: str, num_prompt_tokens: int, block_size: int,
                  counter: int, rng: random.Random) -> WorkerView:
    """The worker for a request among `candidates` (non-empty)."""
    if policy == "round_robin":
        return candidates[counter % len(candidates)]
    if policy == "random":
        return rng.choice(candidates)
    if policy == "least_loaded":
        return _argmin(candidates, lambda w: (w.open_requests, w.kv_usage), counter)
    if policy == "kv":
        # Prefill work this request would cost there (in blocks) plus the decode load already there.
        def cost(w: WorkerView) -> tuple[float, int]:
            uncached = max(num_prompt_tokens - w.overlap_blocks * block_size, 0)
            return (w.pending_prefill_tokens + uncached) / block_size + 4.0 * w.open_requests, w.open_requests
        return _argmin(candidates, cost, counter)
    raise ValueError(f"unknown routing policy {policy!r}; choose one of {', '.join(POLICIES)}")


def choose_prefill_worker(candidates: list[WorkerView], num_prompt_tokens: int, block_size: int,
                          counter: int) -> WorkerView:
    return _argmin(candidates, lambda w: w.pending_prefill_tokens + max(
        num_prompt_tokens - w.overlap_blocks * block_size, 0), counter)


def decide_prefill(uncached_tokens: int, prefill_workers: list[WorkerView], policy: DisaggPolicy) -> str:
    """`local` or `remote`."""
    if not prefill_workers or uncached_tokens < policy.local_prefill_threshold:
        return "local"
    if all(w.pending_prefill_tokens >= policy.max_prefill_queue_tokens for w in prefill_workers):
        return "local"
    return "remote"
