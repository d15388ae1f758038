"""Load predictors: forecast the next intervals' request rate, ISL or OSL from the past ones.

Each predictor owns the history of one series (one value per predictive interval). Lifecycle:
`update(value)` once per interval, `forecast(horizon_steps)` whenever the planner sizes its pools;
with no history a forecast is 0. Invariant: a forecast is never negative (a falling trend
extrapolated far enough would say otherwise; load is floored at zero).

- `MovingAverage(window)`: the mean of the last `window` values (flat: the same for any horizon).
- `Holt(alpha, beta)`: Holt's linear trend (double exponential smoothing), a level and a trend;
  the forecast h steps ahead is level + h x trend, so a rising rate forecasts higher.
- `Seasonal()`: periodic load (a square wave, a daily cycle). It looks for a period in its history
  (the lag with the strongest autocorrelation, once two periods are seen) and forecasts a step by
  the values one, two and three periods before it; with no period found it is Holt.
- `Arima(order)`: statsmodels' ARIMA refitted on the recent history at each forecast. Optional:
  statsmodels is not a dependency; constructing one without it raises a clear ImportError.

`forecast_peak(predictor, horizon_steps)` is the largest forecast over the next steps: what the
planner sizes for when capacity takes that long to arrive.

`make_predictor(name)` builds one by the names `PlannerConfig.predictor` accepts.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Protocol

import numpy as np


class Predictor(Protocol):
    period: int | None
    """The load's period in steps, when the predictor has found one (its forecasts then say what
    comes, not only where the trend points); None otherwise."""

    def update(self, value: float) -> None:
        """Record the latest interval's value."""
        ...

    def forecast(self, horizon_steps: int = 1) -> float:
        """The value expected `horizon_steps` intervals after the latest one (>= 0)."""
        ...


class MovingAverage:
    """The mean of the last `window` values."""

    period: int | None = None  # no periodic model

    def __init__(self, window: int = 5):
        if window < 1:
            raise ValueError(f"the moving average window must be >= 1, not {window}")
        self._values: deque[float] = deque(maxlen=window)

    def update(self, value: float) -> None:
        self._values.append(float(value))

    def forecast(self, horizon_steps: int = 1) -> float:
        if not self._values:
            return 0.0
        return max(0.0, sum(self._values) / len(self._values))


class Holt:
    """Holt's linear trend. The first value sets the level (trend 0); the second sets the level to
    itself and the trend to the step between the two, so an exact ramp is followed from the start;
    after that, for each value v:

        level' = alpha x v + (1 - alpha) x (level + trend)
        trend' = beta x (level' - level) + (1 - beta) x trend
    """

    period: int | None = None  # no periodic model

    def __init__(self, alpha: float = 0.5, beta: float = 0.3):
        if not (0 < alpha <= 1 and 0 <= beta <= 1):
            raise ValueError(f"Holt needs 0 < alpha <= 1 and 0 <= beta <= 1, not alpha={alpha}, beta={beta}")
        self.alpha = alpha
        self.beta = beta
        self.level: float | None = None
        self.trend = 0.0
        self._count = 0

    def update(self, value: float) -> None:
        value = float(value)
        self._count += 1
        if self.level is None:
            self.level = value
        elif self._count == 2:
            self.trend = value - self.level
            self.level = value
        else:
            previous = self.level
            self.level = self.alpha * value + (1 - self.alpha) * (previous + self.trend)
            self.trend = self.beta * (self.level - previous) + (1 - self.beta) * self.trend

    def forecast(self, horizon_steps: int = 1) -> float:
        if self.level is None:
            return 0.0
        return max(0.0, self.level + horizon_steps * self.trend)


class Arima:
    """statsmodels' ARIMA(order) fitted on the last `window` values at each forecast; with fewer than
    `min_points` values it forecasts the latest one (a fit on a handful of points is noise)."""

    period: int | None = None  # no periodic model

    def __init__(self, order: tuple[int, int, int] = (1, 1, 1), window: int = 60, min_points: int = 8):
        try:
            from statsmodels.tsa.arima.model import ARIMA
        except ImportError:
            raise ImportError("the 'arima' predictor needs statsmodels, which tidal does not install: "
                              "`pip install statsmodels`, or use predictor 'holt' or 'moving_average'") from None
        self._arima = ARIMA
        self.order = order
        self.min_points = min_points
        self._values: deque[float] = deque(maxlen=window)

    def update(self, value: float) -> None:
        self._values.append(float(value))

    def forecast(self, horizon_steps: int = 1) -> float:
        if not self._values:
            return 0.0
        if len(self._values) < self.min_points:
            return max(0.0, self._values[-1])
        import warnings
        with warnings.catch_warnings():  # short series make statsmodels warn about convergence
            warnings.simplefilter("ignore")
            fitted = self._arima(list(self._values), order=self.order).fit()
            predicted = float(fitted.forecast(steps=horizon_steps)[-1])
        return max(0.0, predicted)


class Seasonal:
    """Periodic load: a forecast by the same phase of earlier periods, Holt's when there is no period.

    The period is the lag L (in steps, `min_lag` <= L <= n/2, so at least one whole period of pairs)
    maximising the autocorrelation r(L) = sum((x[t] - m)(x[t-L] - m)) / sum((x[t] - m)^2) x n/(n-L);
    it is accepted when r(L) >= `threshold` and the series varies (standard deviation at least
    `min_variation` of its mean). Of the lags within 10% of the best r, the shortest wins (so a
    multiple of the period never does). The forecast h steps after the latest value (index n-1) is
    the mean of x[n-1+h-kL] over the `seasons` smallest k >= 1 that land in the history.
    The period is searched again every `recheck_steps` updates (and whenever none is known yet).
    """

    def __init__(self, min_lag: int = 3, threshold: float = 0.6, seasons: int = 3, min_variation: float = 0.1,
                 max_history: int = 2000, recheck_steps: int = 1):
        if min_lag < 2 or seasons < 1:
            raise ValueError(f"Seasonal needs min_lag >= 2 and seasons >= 1, not {min_lag}, {seasons}")
        self.min_lag = min_lag
        self.threshold = threshold
        self.seasons = seasons
        self.min_variation = min_variation
        self.recheck_steps = recheck_steps
        self._values: deque[float] = deque(maxlen=max_history)
        self._holt = Holt()
        self.period: int | None = None
        self._since_check = 0

    def update(self, value: float) -> None:
        self._values.append(float(value))
        self._holt.update(value)
        self._since_check += 1
        if self.period is None or self._since_check >= self.recheck_steps:
            self.period = find_period(list(self._values), self.min_lag, self.threshold, self.min_variation)
            self._since_check = 0

    def forecast(self, horizon_steps: int = 1) -> float:
        if self.period is None:
            return self._holt.forecast(horizon_steps)
        n, lag = len(self._values), self.period
        k = max(1, math.ceil(horizon_steps / lag))
        picked = []
        while len(picked) < self.seasons:
            index = n - 1 + horizon_steps - k * lag
            if index < 0:
                break
            picked.append(self._values[index])
            k += 1
        return max(0.0, sum(picked) / len(picked)) if picked else self._holt.forecast(horizon_steps)


def find_period(values: list[float], min_lag: int = 3, threshold: float = 0.6,
                min_variation: float = 0.1) -> int | None:
    """The period of `values` in steps (see `Seasonal`), or None."""
    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    if n < 2 * min_lag:
        return None
    mean = float(x.mean())
    centred = x - mean
    power = float(np.dot(centred, centred))
    if power <= 0 or math.sqrt(power / n) < min_variation * abs(mean):
        return None
    lags = np.arange(min_lag, n // 2 + 1)
    r = np.array([np.dot(centred[lag:], centred[:-lag]) / power * n / (n - lag) for lag in lags])
    best = float(r.max())
    if best < threshold:
        return None
    return int(lags[np.argmax(r >= 0.9 * best)])


def forecast_peak(predictor: Predictor, horizon_steps: int) -> float:
    """The largest of the forecasts 1..horizon_steps steps ahead."""
    return max(predictor.forecast(h) for h in range(1, max(1, horizon_steps) + 1))


def make_predictor(name: str) -> Predictor:
    """A fresh predictor by name: `moving_average`, `holt`, `seasonal` or `arima` (default parameters)."""
    if name == "moving_average":
        return MovingAverage()
    if name == "holt":
        return Holt()
    if name == "seasonal":
        return Seasonal()
    if name == "arima":
        return Arima()
    raise ValueError(f"unknown predictor {name!r}: expected 'moving_average', 'holt', 'seasonal' or 'arima'")
