"""The fleet simulator's clock and event heap: `now` moves only when an event is popped, so a run
costs what its events cost, not what its simulated minutes would on a wall clock.

An event is (time_s, sequence, kind, payload, version): equal times pop in the order they were
scheduled; `version` lets a worker invalidate its earlier decode events by bumping its own.
"""

from __future__ import annotations

import heapq
import itertools


class EventQueue:
    def __init__(self) -> None:
        self.now = 0.0
        self._events: list = []
        self._seq = itertools.count()

    def at(self, time_s: float, kind: str, payload=None, version: int = 0) -> None:
        heapq.heappush(self._events, (time_s, next(self._seq), kind, payload, version))

    def after(self, delay_s: float, kind: str, payload=None, version: int = 0) -> None:
        self.at(self.now + delay_s, kind, payload, version)

    def pop(self) -> tuple[float, str, object, int]:
        """The next event; the clock moves to its time."""
        time_s, _, kind, payload, version = heapq.heappop(self._events)
        self.now = time_s
        return time_s, kind, payload, version

    def peek_time(self) -> float:
        return self._events[0][0]

    def __bool__(self) -> bool:
        return bool(self._events)
