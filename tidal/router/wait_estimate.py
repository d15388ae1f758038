"""How long a new request would wait for its first token: the queue ahead of it over the measured service rate.

A worker with a queue starts a waiting request when a running one finishes, so requests leave its
queue at `decode tokens/s ÷ output tokens per request`. Both parts are measured:
- `DecodeRate`: a worker's decode throughput (tokens/s) while it had a queue, an EWMA over its load
  reports (`EngineStats.generation_tokens` is cumulative; intervals without a queue at both ends
  are left out, since an unsaturated worker says nothing about how fast a queue drains). The
  reports are the worker's own, so every router replica measures the same rate. It is kept through
  idle periods: the last saturated throughput stays the best guess for the next burst.
- `output_tokens_per_request`: the mean output length of the router's recently finished requests
  (a ratio, alike in every replica that gets an even share of the traffic); before any finished,
  the new request's own `max_tokens` (pessimistic: a cold burst sheds early rather than late).

`estimate_wait_s` combines them with the queue ahead: the requests queued in this router (served by
the whole fleet) plus, on the least-waiting worker, the requests queued there (its last report's
count plus what this router sent it since). A worker whose rate is not measured yet counts as no
wait: the estimate sheds only on what it has measured. Pure: no I/O, no clock.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import islice

from tidal.fleet_snapshot import FinishedRequest
from tidal.protocol import EngineStats

RATE_TIME_CONSTANT_S = 5.0
"""The EWMA's memory: a decode-rate sample `dt` seconds long weighs `1 - exp(-dt / this)`."""
RECENT_FINISHES = 64
"""Finished requests whose mean output length stands for the next requests'."""


class DecodeRate:
    """One worker's decode tokens/s while it had a queue (None until measured)."""

    def __init__(self) -> None:
        self.tokens_per_s: float | None = None
        self._last: tuple[float, int, int] | None = None  # (report time, generation tokens, waiting)

    def observe(self, stats: EngineStats, time_s: float) -> None:
        """A load report published at `time_s` (the worker's clock)."""
        last, self._last = self._last, (time_s, stats.generation_tokens, stats.num_waiting)
        if last is None:
            return
        then, tokens, waiting = last
        dt, produced = time_s - then, stats.generation_tokens - tokens
        # No queue at either end: not saturated. Nothing produced: a prefill-only interval (or a
        # restarted worker's counters); neither measures how fast a queue drains.
        if dt <= 0 or produced <= 0 or waiting == 0 or stats.num_waiting == 0:
            return
        sample = produced / dt
        if self.tokens_per_s is None:
            self.tokens_per_s = sample
        else:
            self.tokens_per_s += (1.0 - math.exp(-dt / RATE_TIME_CONSTANT_S)) * (sample - self.tokens_per_s)


def output_tokens_per_request(finished: Sequence[FinishedRequest], fallback: int) -> float:
    """Mean output length of the last `RECENT_FINISHES` finished requests (`finished` oldest
    first); `fallback` before any finished."""
    recent = [f.output_tokens for f in islice(reversed(finished), RECENT_FINISHES)]
    return sum(recent) / len(recent) if recent else float(max(fallback, 1))


@dataclass(frozen=True)
class WorkerQueue:
    """A decode-capable worker's queue as a router sees it."""

    waiting: int
    tokens_per_s: float | None  # `DecodeRate.tokens_per_s`


def estimate_wait_s(queued_in_router: int, workers: Iterable[WorkerQueue], output_tokens: float) -> float:
    """Seconds a new request would wait: the `queued_in_router` requests ahead of it drain at the
    fleet's measured rate, then it waits for the least-waiting worker. 0 when nothing is measured."""
    workers = list(workers)
    if not workers:
        return 0.0
    worker_waits = [w.waiting * output_tokens / w.tokens_per_s if w.waiting and w.tokens_per_s else 0.0
                    for w in workers]
    fleet_tokens_per_s = sum(w.tokens_per_s or 0.0 for w in workers)
    router_wait = queued_in_router * output_tokens / fleet_tokens_per_s if fleet_tokens_per_s > 0 else 0.0
    return router_wait + min(worker_waits)
