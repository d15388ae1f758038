"""Arrival processes for the load generator: when each request (or session) starts.

Every process yields arrival times in seconds from the start of the run, in order, from a seeded
`random.Random`, so a run can be replayed exactly:

- `constant(rate)`: evenly spaced;
- `poisson(rate)`: exponential gaps (coefficient of variation 1);
- `gamma(rate, burstiness)`: gamma gaps of shape k = burstiness and the same mean, so the
  coefficient of variation is 1/sqrt(k) (k < 1: burstier than Poisson; k = 1: Poisson);
- time-varying Poisson by thinning (Lewis-Shedler), with a rate function:
  `square(base_rate, burst_factor, burst_s, calm_s)` (bursts at base x factor, then calm at base),
  `sine(mean_rate, amplitude, period_s)` and `ramp(start_rate, end_rate, duration_s)`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

ARRIVALS = ("constant", "poisson", "gamma", "square", "sine", "ramp")


@dataclass(frozen=True)
class ArrivalShape:
    """The shape parameters of the arrival processes, with their one default each."""

    burstiness: float = 1.0
    """gamma: 1 is Poisson; below 1 burstier (the inter-arrival times' shape parameter)."""
    burst_factor: float = 4.0
    """square: the burst's rate over the calm one."""
    burst_s: float = 10.0
    calm_s: float = 30.0
    amplitude: float = 0.8
    """sine: the swing as a share of the mean rate."""
    period_s: float = 60.0
    duration_s: float = 60.0
    """ramp: the time from the start rate to the end rate."""


def constant(rate: float, rng: random.Random | None = None) -> Iterator[float]:
    t = 0.0
    while True:
        yield t
        t += 1.0 / rate


def poisson(rate: float, rng: random.Random) -> Iterator[float]:
    t = 0.0
    while True:
        t += rng.expovariate(rate)
        yield t


def gamma(rate: float, burstiness: float, rng: random.Random) -> Iterator[float]:
    """Gamma gaps with shape `burstiness` and mean 1/rate (scale = 1 / (rate x burstiness))."""
    t = 0.0
    scale = 1.0 / (rate * burstiness)
    while True:
        t += rng.gammavariate(burstiness, scale)
        yield t


def thinned(rate_fn: Callable[[float], float], max_rate: float, rng: random.Random) -> Iterator[float]:
    """A Poisson process with time-varying rate `rate_fn(t) <= max_rate`."""
    t = 0.0
    while True:
        t += rng.expovariate(max_rate)
        if rng.random() * max_rate <= rate_fn(t):
            yield t


def square_rate(base_rate: float, burst_factor: float, burst_s: float, calm_s: float) -> Callable[[float], float]:
    """Bursts first: [0, burst_s) at base x factor, then [burst_s, burst_s + calm_s) at base, repeated."""
    period = burst_s + calm_s
    return lambda t: base_rate * burst_factor if (t % period) < burst_s else base_rate


def sine_rate(mean_rate: float, amplitude: float, period_s: float) -> Callable[[float], float]:
    """mean x (1 + amplitude x sin(2 pi t / period)), amplitude in [0, 1]."""
    return lambda t: mean_rate * (1.0 + amplitude * math.sin(2 * math.pi * t / period_s))


def ramp_rate(start_rate: float, end_rate: float, duration_s: float) -> Callable[[float], float]:
    return lambda t: start_rate + (end_rate - start_rate) * min(t / duration_s, 1.0)


def make_arrivals(kind: str, rate: float, rng: random.Random, *, burstiness: float = ArrivalShape.burstiness,
                  burst_factor: float = ArrivalShape.burst_factor, burst_s: float = ArrivalShape.burst_s,
                  calm_s: float = ArrivalShape.calm_s, amplitude: float = ArrivalShape.amplitude,
                  period_s: float = ArrivalShape.period_s, end_rate: float | None = None,
                  duration_s: float = ArrivalShape.duration_s) -> Iterator[float]:
    """The named process at `rate` (its base rate for square, its mean for sine, its start for ramp)."""
    if rate <= 0:
        raise ValueError("the arrival rate must be positive")
    if kind == "constant":
        return constant(rate)
    if kind == "poisson":
        return poisson(rate, rng)
    if kind == "gamma":
        if burstiness <= 0:
            raise ValueError("burstiness (the gamma shape) must be positive")
        return gamma(rate, burstiness, rng)
    if kind == "square":
        return thinned(square_rate(rate, burst_factor, burst_s, calm_s), rate * max(burst_factor, 1.0), rng)
    if kind == "sine":
        if not 0 <= amplitude <= 1:
            raise ValueError("the sine amplitude must lie in [0, 1]")
        return thinned(sine_rate(rate, amplitude, period_s), rate * (1 + amplitude), rng)
    if kind == "ramp":
        end = rate if end_rate is None else end_rate
        return thinned(ramp_rate(rate, end, duration_s), max(rate, end), rng)
    raise ValueError(f"unknown arrival process {kind!r}; choose one of {', '.join(ARRIVALS)}")
