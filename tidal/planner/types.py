"""The planner's vocabulary: what it observes, how it is configured, what it decides.

Values (frozen dataclasses) and the percentile rule they are summarized with, so the pure core (`tidal.planner.core.Planner`), its adapters (the
observation collector in a running deployment, the fleet simulator) and the actuators share one
contract and never each other's code. Units are in the names. Imports nothing from the engine,
router or models (a worker's `Role` is the wire type's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Annotated, Literal

from annotated_types import Ge, Le

from tidal.config import NonNegative, Positive, validate_fields
from tidal.protocol import Role

WorkerState = Literal["starting", "active", "draining", "flipping", "stopping"]
ActionKind = Literal["add", "remove", "flip"]


@dataclass(frozen=True)
class WorkerObservation:
    """One worker over the last observation interval (rates and means over that interval)."""

    worker_id: str
    role: Role
    state: WorkerState = "active"
    num_running: int = 0  # requests in its batch at the end of the interval
    num_waiting: int = 0  # requests queued in its scheduler
    pending_prefill_tokens: int = 0  # prompt tokens not yet prefilled (its queue, in tokens)
    kv_used_fraction: float = 0.0
    steps: int = 0  # engine steps in the interval
    step_s_mean: float = 0.0  # mean wall time of those steps
    prefill_tokens: int = 0  # prompt tokens computed in the interval
    decode_tokens: int = 0  # output tokens produced in the interval
    decode_batch_mean: float = 0.0  # mean decode sequences per step
    context_tokens_mean: float = 0.0  # mean context length of those sequences
    kv_capacity_tokens: int = 0  # tokens its KV cache holds (0: not reported)
    reported: bool = True
    """False: no load report from it yet (starting, or connected before its first report): its load
    fields above are defaults, not measurements, and the planner reads none of them."""


@dataclass(frozen=True)
class FrontendObservation:
    """Request-level figures over the last interval (None where nothing finished)."""

    request_rate: float = 0.0  # arrivals per second
    ttft_ms_p50: float | None = None
    ttft_ms_p90: float | None = None
    itl_ms_p50: float | None = None
    itl_ms_p90: float | None = None
    isl_mean: float | None = None  # prompt tokens per request
    osl_mean: float | None = None  # output tokens per request
    prefix_hit_rate: float = 0.0  # share of prompt tokens found in a prefix cache
    queue_depth: int = 0  # requests waiting in the router for a worker
    num_requests: int = 0  # arrivals in the interval


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of observed latencies; None for no values. The one rule
    every adapter (the deployment's collector, the fleet simulator) summarizes requests with."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered), max(1, math.ceil(len(ordered) * q / 100))) - 1]


@dataclass(frozen=True)
class Observation:
    time_s: float  # a monotonic clock (simulated or real)
    interval_s: float  # the span the rates and means cover
    frontend: FrontendObservation
    workers: tuple[WorkerObservation, ...]


def merge_observations(observations: list[Observation]) -> Observation:
    """Several frontends' observations of the same interval as one (the first one's clock and
    workers: every frontend sees the same workers, whose step counters are their own). Arrivals,
    requests and queues add up; ISL, OSL and prefix hit rate are request-weighted means; a latency
    percentile is the largest of the frontends' (an upper bound of the merged one: at least that
    share of every frontend's requests is under it)."""
    if len(observations) == 1:
        return observations[0]
    fronts = [o.frontend for o in observations]
    weights = [f.num_requests or 0 for f in fronts]

    def weighted(name: str) -> float | None:
        pairs = [(w, getattr(f, name)) for w, f in zip(weights, fronts) if getattr(f, name) is not None]
        total = sum(w for w, _ in pairs)
        if not pairs:
            return None
        return sum(w * v for w, v in pairs) / total if total else sum(v for _, v in pairs) / len(pairs)

    def worst(name: str) -> float | None:
        values = [getattr(f, name) for f in fronts if getattr(f, name) is not None]
        return max(values) if values else None

    merged = FrontendObservation(
        request_rate=sum(f.request_rate for f in fronts), ttft_ms_p50=worst("ttft_ms_p50"),
        ttft_ms_p90=worst("ttft_ms_p90"), itl_ms_p50=worst("itl_ms_p50"), itl_ms_p90=worst("itl_ms_p90"),
        isl_mean=weighted("isl_mean"), osl_mean=weighted("osl_mean"),
        prefix_hit_rate=weighted("prefix_hit_rate") or 0.0, queue_depth=sum(f.queue_depth for f in fronts),
        num_requests=sum(weights))
    first = observations[0]
    return Observation(time_s=first.time_s, interval_s=first.interval_s, frontend=merged, workers=first.workers)


@dataclass(frozen=True)
class SLO:
    ttft_ms: Annotated[float, Positive] = 1000.0  # P90 target
    itl_ms: Annotated[float, Positive] = 50.0  # P90 target

    def __post_init__(self) -> None:
        validate_fields(self)


@dataclass(frozen=True)
class PlannerConfig:
    slo: SLO = field(default_factory=SLO)
    max_workers: Annotated[int, Ge(1)] = 8
    """The GPU budget, in workers: prefill + decode never exceed it."""
    min_prefill: Annotated[int, NonNegative] = 0
    """Prefill workers to keep (0: decode workers may prefill everything themselves)."""
    min_decode: Annotated[int, Ge(1)] = 1
    reactive_interval_s: Annotated[float, Positive] = 2.0
    """The fast loop: acts when queues or estimated TTFT/ITL cross their targets."""
    predictive_interval_s: Annotated[float, Positive] = 30.0
    """The slow loop: forecasts rate and lengths, sizes each pool from the performance model."""
    predictor: Literal["moving_average", "holt", "seasonal", "arima"] = "seasonal"
    """Forecasts the request rate, ISL and OSL one predictive interval per step; `seasonal` finds a
    period when there is one (Holt otherwise)."""
    headroom: Annotated[float, NonNegative] = 0.15
    """Size pools for (1 + headroom) x the forecast load."""
    worker_startup_s: Annotated[float, Positive] = 30.0
    """How long an added worker takes to serve, before the planner has seen one start (then it uses
    what it saw). The predictive loop sizes for the highest rate forecast over the next start-up
    time + predictive interval: the soonest capacity it orders now can help."""
    backlog_clear_s: Annotated[float, Positive] = 20.0
    """The reactive loop sizes a pool in trouble to serve the current rate plus its queue within this."""
    scale_down_cooldown_s: Annotated[float, NonNegative] = 30.0
    """No removal or flip away from a pool within this long of adding to it (no flapping)."""
    allow_flips: bool = True
    """Move capacity by flipping a worker's role (fast, no weight reload) before adding/removing."""
    decode_prefill_share: Annotated[float, Ge(0), Le(1)] = 0.25
    """With `min_prefill` 0, when the budget is short the last prefill worker may become a decode
    worker if the decode workers can absorb its prefill load (conditional disaggregation: they
    prefill locally): the prefill need, in workers, at most this share of the decode workers. 0:
    always keep a prefill worker while any prefill is needed."""

    def __post_init__(self) -> None:
        validate_fields(self)


@dataclass(frozen=True)
class Thresholds:
    queue_wait_fraction: float = 0.5
    """TTFT is in trouble when the queued prefill tokens take longer than this share of the TTFT
    target to drain at the prefill pool's throughput."""
    kv_pressure: float = 0.9
    """ITL is in trouble when the decode workers' mean KV use exceeds this."""
    slack_fraction: float = 0.6
    """A pool has slack (may give a worker away, or lose one when idle) when each of its signals is
    under this share of its target."""
    pending_timeout_s: float = 300.0
    """Forget an action not seen finished after this long (an actuator that failed)."""
    decode_queue_workers: float = 0.25
    """The decode pool is in trouble when the requests waiting for a decode slot would fill this
    share of one worker's batch."""
    trouble_calls: int = 2
    """The reactive loop grows a pool only after it has been in trouble (or over capacity) this many
    calls in a row: one huge prompt in the queue, or one noisy interval, is not a trend."""
    recent_calls: int = 5
    """The rate "seen now" is the mean over this many calls (the latest observations)."""
    lengths_window_s: float = 60.0
    """ISL, OSL and prefix hit rate "seen now" are request-weighted means decaying with this time
    constant (one interval's mean of a heavy-tailed trace is noise)."""
    length_windows: int = 6
    """The predictive loop forecasts ISL and OSL by the mean of this many windows."""
    scale_down_window_s: float = 60.0
    """With no period found in the load, a pool is only cut to the largest target of this long
    (a dip in an aperiodic load is no reason to give back capacity that takes a start-up to return);
    with a period, the forecast already says what is coming and the cut is to the latest target."""
    startup_alpha: float = 0.5
    """Weight of the newest start-up time seen in the planner's estimate (EWMA)."""


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    role: Role  # add: the new worker's role; flip: the role it takes; remove: the role it had
    worker_id: str | None = None  # remove / flip: which worker (None for add)
    reason: str = ""  # a metric label: e.g. "ttft_over_slo", "itl_over_slo", "step_over_itl", "forecast", "idle"


@dataclass(frozen=True)
class Decision:
    time_s: float
    target_prefill: int
    target_decode: int
    actions: tuple[Action, ...] = ()
    loop: Literal["reactive", "predictive", "none"] = "none"
    explanation: str = ""  # one log line: the numbers behind the decision
    reason: str = ""
    """Why a wanted action was not taken (a metric label: "at_budget"); empty otherwise."""
