"""Load predictors: forecast the next intervals' request rate, ISL or OSL from the past ones.

Each predictor owns the history of one series (one value per predictive interval). Lifecycle:
`update(value)` once per interval, `forecast(horizon_steps)` whenever the planner sizes its pools;
with no history a forecast is 0. Invariant: a forecast is never negative (a falling trend
extrapolated far enough would say otherwise; load is floored at zero).

- `MovingAverage(window)`: the mean of the last `window` values (flat: the same for any horizon).
- `Holt(alpha, beta)`: Holt's linear trend (double exponential smoothing), a level and a trend;
  the forecast h steps ahead is level + h x trend, so a rising rate forecasts higher.
- `Arima(order)`: statsmodels' ARIMA refitted on the recent history at each forecast. Optional:
  statsmodels is not a dependency; constructing one without it raises a clear ImportError.

`make_predictor(name)` builds one by the names `PlannerConfig.predictor` accepts.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol


class Predictor(Protocol):
    def update(self, value: float) -> None:
        """Record the latest interval's value."""
        ...

    def forecast(self, horizon_steps: int = 1) -> float:
        """The value expected `horizon_steps` intervals after the latest one (>= 0)."""
        ...


class MovingAverage:
    """The mean of the last `window` values."""

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


def make_predictor(name: str) -> Predictor:
    """A fresh predictor by name: `moving_average`, `holt` or `arima` (default parameters)."""
    if name == "moving_average":
        return MovingAverage()
    if name == "holt":
        return Holt()
    if name == "arima":
        return Arima()
    raise ValueError(f"unknown predictor {name!r}: expected 'moving_average', 'holt' or 'arima'")
