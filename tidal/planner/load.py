"""What the planner has seen of the load, folded from each observation.

Owns: the arrivals of the last `recent_calls` observations (the rate "seen now"); the decaying
request-weighted sums of ISL, OSL and prefix hit rate (the lengths "seen now"); the window of what
the frontend reported since the last predictive loop; and the start-up time of a worker, from the
configured value towards what it sees (a worker first seen `starting`, later `active`).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from tidal.planner.types import FrontendObservation, Observation, Thresholds


@dataclass
class Window:
    """What the frontend reported since the last predictive loop."""

    span_s: float = 0.0
    arrivals: float = 0.0
    isl_weighted: tuple[float, float] = (0.0, 0.0)  # (sum of weight x ISL, sum of weights)
    osl_weighted: tuple[float, float] = (0.0, 0.0)
    prefix_hit_rate: float = 0.0

    def add(self, frontend: FrontendObservation, interval_s: float) -> None:
        arrivals = frontend.request_rate * interval_s
        weight = frontend.num_requests or arrivals or 1e-9
        self.span_s += interval_s
        self.arrivals += arrivals
        if frontend.isl_mean is not None:
            self.isl_weighted = (self.isl_weighted[0] + weight * frontend.isl_mean, self.isl_weighted[1] + weight)
        if frontend.osl_mean is not None:
            self.osl_weighted = (self.osl_weighted[0] + weight * frontend.osl_mean, self.osl_weighted[1] + weight)
        self.prefix_hit_rate = frontend.prefix_hit_rate

    def rate(self) -> float:
        return self.arrivals / self.span_s if self.span_s > 0 else 0.0

    @staticmethod
    def mean(weighted: tuple[float, float]) -> float | None:
        return weighted[0] / weighted[1] if weighted[1] > 0 else None


class LoadTracker:
    def __init__(self, thresholds: Thresholds, startup_s: float) -> None:
        self.thresholds = thresholds
        self.window = Window()  # since the last predictive loop
        self._recent: deque[tuple[float, float]] = deque(maxlen=thresholds.recent_calls)  # (span, arrivals)
        self._length_sums = [0.0, 0.0, 0.0, 0.0]  # decayed sums: weight, weight x ISL, x OSL, x prefix hit
        self.startup_s = startup_s  # start-up time: configured, then as seen
        self._starting_since: dict[str, float] = {}

    def fold(self, obs: Observation) -> None:
        self.window.add(obs.frontend, obs.interval_s)
        self._recent.append((obs.interval_s, obs.frontend.request_rate * obs.interval_s))
        self._fold_lengths(obs)
        self._watch_startups(obs)

    def take_window(self) -> Window:
        """The window since the last predictive loop; a new one starts."""
        window, self.window = self.window, Window()
        return window

    def rate_now(self) -> float:
        """Arrivals per second over the last `recent_calls` observations."""
        span = sum(span for span, _ in self._recent)
        return sum(arrivals for _, arrivals in self._recent) / span if span > 0 else 0.0

    @property
    def lengths(self) -> tuple[float, float, float]:
        """ISL, OSL and prefix hit rate seen now (request-weighted, decaying)."""
        weight, isl, osl, hit = self._length_sums
        return (isl / weight, osl / weight, hit / weight) if weight > 0 else (0.0, 0.0, 0.0)

    def _fold_lengths(self, obs: Observation) -> None:
        front = obs.frontend
        decay = math.exp(-obs.interval_s / self.thresholds.lengths_window_s)
        self._length_sums = [x * decay for x in self._length_sums]
        if front.isl_mean is not None and front.osl_mean is not None:
            weight = max(front.num_requests, 1)
            for i, value in enumerate((1.0, front.isl_mean, front.osl_mean, front.prefix_hit_rate)):
                self._length_sums[i] += weight * value

    def _watch_startups(self, obs: Observation) -> None:
        """Time each worker from first seen `starting` to `active` (plus one interval: it was ordered
        before it was seen) and fold that into `startup_s`."""
        for w in obs.workers:
            if w.state == "starting":
                self._starting_since.setdefault(w.worker_id, obs.time_s - obs.interval_s)
            elif w.worker_id in self._starting_since:
                since = self._starting_since.pop(w.worker_id)
                if w.state == "active":
                    a = self.thresholds.startup_alpha
                    self.startup_s = (1 - a) * self.startup_s + a * (obs.time_s - since)
        alive = {w.worker_id for w in obs.workers}
        for worker_id in [i for i in self._starting_since if i not in alive]:
            del self._starting_since[worker_id]
