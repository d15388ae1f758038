"""The fleet as the router publishes it: what the planner (and anything else above the router that
watches the fleet) reads, instead of the router's own state.

`FleetSnapshot` is a frozen value built by `Router.snapshot()` on demand: one `WorkerSnapshot` per
worker discovery lists (connected or still starting), what the router's admission queue holds, its
arrivals so far, and its log of finished requests (`FinishedRequest`, the newest `MAX_FINISHED`).
Readers keep their own place (a time, a count) and diff successive snapshots. Times are
`time.monotonic()` seconds. Imports only the wire types.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tidal.protocol import EngineStats, Role


@dataclass(frozen=True)
class FinishedRequest:
    finished_at: float
    ttft_s: float  # arrival at the router (queueing included) to the first token
    itl_s: float | None  # mean gap between later tokens (None with one output token)
    prompt_tokens: int
    cached_tokens: int  # prompt tokens a prefix cache already held
    output_tokens: int


@dataclass(frozen=True)
class WorkerSnapshot:
    worker_id: str
    role: Role
    connected: bool = True
    """False: discovery lists it, the router has not connected to it yet (it is starting)."""
    draining: bool = False
    """The router routes nothing new to it (drained for a flip or removal, or leaving)."""
    pending_prefill_tokens: int = 0
    """Prompt tokens sent there without a token back yet (the router's count or the worker's report)."""
    block_size: int = 0
    """Tokens per KV block (0: not connected)."""
    stats: EngineStats | None = None
    """Its latest load report (None before the first)."""


@dataclass(frozen=True)
class FleetSnapshot:
    time_s: float
    workers: tuple[WorkerSnapshot, ...]
    queue_depth: int
    """Requests waiting in the router for a worker with room (every replica's, where it knows them)."""
    arrivals_total: int
    """Requests that arrived at the router since it started."""
    finished: tuple[FinishedRequest, ...]
    """The router's log of finished requests, oldest first (bounded: the newest only)."""

    def finished_since(self, t: float) -> list[FinishedRequest]:
        """Requests that finished after `t`, oldest first."""
        return finished_since(self.finished, t)


def finished_since(finished: Sequence[FinishedRequest], t: float) -> list[FinishedRequest]:
    """The entries of a log in time order that finished after `t`, oldest first (read newest first,
    stopping at the first older one)."""
    out = []
    for entry in reversed(finished):
        if entry.finished_at <= t:
            break
        out.append(entry)
    out.reverse()
    return out
