"""The restart policy of `tidal serve`: when a process that died starts again, or that it stays down.

`RestartPolicy` is pure (the caller gives it the time; its randomness is a `random.Random` it
owns). It keeps, per process name, the times of that process's restarts within the last
`RestartConfig.window_s`. `on_exit(name, now)` answers the delay before the next start: the
backoff `backoff_s * 2**k` (k: restarts already in the window), capped at `max_backoff_s` and
shortened by up to `jitter` of itself, and counts that restart; or None once `max_restarts`
restarts are in the window (the process stays down). `forget(name)` drops a process's history
(it was removed on purpose).

Both supervisors of `tidal serve` use it: the launcher's (worker processes,
`tidal.deploy.launcher`) and the API server pool's (`tidal.deploy.api_servers`).
`exit_reason` words a process's exit code for their log lines; `worker_restart_counter` and
`api_server_restart_counter` are the Prometheus counters they count restarts on.
"""

from __future__ import annotations

import random
import signal
from collections import deque

from prometheus_client import CollectorRegistry, Counter

from tidal.config import RestartConfig


class RestartPolicy:
    def __init__(self, config: RestartConfig, rng: random.Random | None = None) -> None:
        self.config = config
        self._rng = rng or random.Random()
        self._restarts: dict[str, deque[float]] = {}

    def on_exit(self, name: str, now: float) -> float | None:
        """`name` exited unexpectedly at `now` (seconds, any monotonic clock): the delay before it
        starts again (counted as a restart), or None when it has had `max_restarts` restarts within
        `window_s` and must stay down."""
        c = self.config
        recent = self._restarts.setdefault(name, deque())
        while recent and recent[0] <= now - c.window_s:
            recent.popleft()
        if len(recent) >= c.max_restarts:
            return None
        backoff_s = min(c.max_backoff_s, c.backoff_s * 2 ** len(recent))
        delay_s = backoff_s * (1 - c.jitter * self._rng.random())
        recent.append(now)
        return delay_s

    def restarts(self, name: str, now: float) -> int:
        """Restarts of `name` within the window ending at `now`."""
        return sum(1 for t in self._restarts.get(name, ()) if t > now - self.config.window_s)

    def forget(self, name: str) -> None:
        self._restarts.pop(name, None)


def exit_reason(exitcode: int | None) -> str:
    """A process's end in words: `exited with code 3`, `was killed by SIGKILL`."""
    if exitcode is None:
        return "is still running"
    if exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


def worker_restart_counter(registry: CollectorRegistry | None) -> Counter:
    """`tidal_worker_restarts_total{worker,role}` on `registry` (None: on none; in multiprocess mode
    the metric files render it on every API server's /metrics)."""
    return Counter("tidal_worker_restarts", "Worker processes restarted after an unexpected exit.",
                   ["worker", "role"], registry=registry)


def api_server_restart_counter(registry: CollectorRegistry | None) -> Counter:
    """`tidal_api_server_restarts_total{api_server}` (the API server's index), as above."""
    return Counter("tidal_api_server_restarts", "API server processes restarted after an unexpected exit.",
                   ["api_server"], registry=registry)
