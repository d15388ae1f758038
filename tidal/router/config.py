"""The router's settings: one frozen value, resolved once by whoever builds the router."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from tidal.config import NonNegative, Positive, validate_fields
from tidal.router.policy import DisaggPolicy, KVWeights, RoutingPolicy


@dataclass(frozen=True)
class RouterConfig:
    policy: RoutingPolicy = "round_robin"
    """How a decode (or aggregated) worker is chosen: round_robin, random, least_loaded, kv."""
    weights: KVWeights = field(default_factory=KVWeights)
    """kv policy weights (a request's `routing` options override them)."""
    disagg: DisaggPolicy = field(default_factory=DisaggPolicy)
    max_pending_prefill_tokens: Annotated[int, Positive] = 32768
    """A worker with this many prompt tokens waiting for their first token is full; when all are,
    requests wait in the router's queue."""
    max_queue: Annotated[int, NonNegative] = 1024
    """Requests allowed to wait; more are refused (503, Retry-After)."""
    queue_timeout_s: Annotated[float, Positive] = 30.0
    """The longest a request may wait for its first token while workers are overloaded: refused
    (503, Retry-After) at admission when its estimated wait is longer (`shed_on_wait_estimate`),
    when still in the router's queue at this deadline, or when still without a token at it on a
    worker that has a queue (the worker then aborts it)."""
    max_waiting_per_worker: Annotated[int, NonNegative] = 128
    """A request is refused (503, Retry-After) when every worker that can serve it has this many
    requests queued (its load report's count plus what this router sent it since); 0: no limit."""
    shed_on_wait_estimate: bool = True
    """Refuse a request (503, Retry-After) whose estimated wait (the queue ahead of it over the
    measured service rate, `tidal.router.wait_estimate`) exceeds `queue_timeout_s`."""
    max_migrations: Annotated[int, NonNegative] = 3
    """Times one request may move to another worker when its worker goes away mid-stream; past
    that the client gets the error."""
    seed: int = 0

    def __post_init__(self) -> None:
        validate_fields(self)
