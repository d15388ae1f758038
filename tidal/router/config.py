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
    """A request that waits longer is refused (503, Retry-After)."""
    max_migrations: Annotated[int, NonNegative] = 3
    """Times one request may move to another worker when its worker goes away mid-stream; past
    that the client gets the error."""
    seed: int = 0

    def __post_init__(self) -> None:
        validate_fields(self)
