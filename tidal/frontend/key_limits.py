"""Per-API-key request limits: a request rate (token bucket) and a number of open requests.

`KeyLimiter` is the pure core (no I/O; the caller passes the clock), used by the access middleware
(`tidal.frontend.access`): `admit(key, now)` either counts a request in and returns None, or
returns the `Refusal` (which limit, and when to retry) and counts nothing; every admitted request
is `release`d exactly once when its response has ended (a stream: its last event).

State per key: a bucket of up to `requests_per_minute` tokens refilled at that rate per minute, so
a quiet key may burst its whole minute at once, and a count of open requests. Keys are the server's
configured ones, so the table is bounded. Invariant: `open_requests(key)` equals the admitted
requests not yet released, and never exceeds `max_concurrent` (when it is set).

The limits are per process: with N API server processes on one port, a key may reach N times each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SECONDS_PER_MINUTE = 60.0


@dataclass(frozen=True)
class Refusal:
    limit: str
    """`requests_per_minute` or `concurrent_requests`."""
    retry_after_s: int
    """Whole seconds until the key may try again (at least 1)."""


@dataclass
class _KeyState:
    tokens: float
    refilled_at: float
    open_requests: int = 0


class KeyLimiter:
    def __init__(self, requests_per_minute: int = 0, max_concurrent: int = 0) -> None:
        """0 turns a limit off."""
        self.requests_per_minute = requests_per_minute
        self.max_concurrent = max_concurrent
        self._keys: dict[str, _KeyState] = {}

    @property
    def enabled(self) -> bool:
        return bool(self.requests_per_minute or self.max_concurrent)

    def admit(self, key: str, now: float) -> Refusal | None:
        state = self._keys.get(key)
        if state is None:
            state = self._keys[key] = _KeyState(tokens=float(self.requests_per_minute), refilled_at=now)
        if self.max_concurrent and state.open_requests >= self.max_concurrent:
            return Refusal("concurrent_requests", 1)
        if self.requests_per_minute:
            rate_per_s = self.requests_per_minute / SECONDS_PER_MINUTE
            elapsed_s = max(0.0, now - state.refilled_at)
            state.tokens = min(float(self.requests_per_minute), state.tokens + elapsed_s * rate_per_s)
            state.refilled_at = now
            if state.tokens < 1.0:
                return Refusal("requests_per_minute", max(1, math.ceil((1.0 - state.tokens) / rate_per_s)))
            state.tokens -= 1.0
        state.open_requests += 1
        return None

    def release(self, key: str) -> None:
        state = self._keys[key]
        assert state.open_requests > 0, f"key {key!r} released more requests than it was admitted"
        state.open_requests -= 1

    def open_requests(self, key: str) -> int:
        state = self._keys.get(key)
        return 0 if state is None else state.open_requests
