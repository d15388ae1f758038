"""The fleet simulator's configuration: the simulated hardware (batch, KV, transfer, start-up) and
the router's knobs, which mean what the live router's do (`tidal.router.policy`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from tidal.config import FLEET_PREFILL_TOKEN_BUDGET
from tidal.router.config import RouterConfig
from tidal.router.policy import DisaggPolicy, KVWeights


@dataclass(frozen=True)
class FleetConfig:
    token_budget: int = FLEET_PREFILL_TOKEN_BUDGET
    """Prefill tokens per step on a prefill worker (a profile's knee is a good choice)."""
    max_decode_batch: int = 256
    """Sequences in one decode worker's batch at most."""
    kv_capacity_tokens: int = 491_520
    """KV tokens a decode worker holds (30720 blocks x 16 on the H200 profile)."""
    local_prefill_tokens: int = 256
    """Prompts with fewer uncached tokens prefill on their decode worker (conditional disaggregation:
    `DisaggPolicy.local_prefill_threshold`)."""
    max_prefill_queue_tokens: int = DisaggPolicy.max_prefill_queue_tokens
    """A prefill worker with this many pending prefill tokens is full; when all are, prompts prefill
    on their decode worker (`DisaggPolicy.max_prefill_queue_tokens`)."""
    policy: str = "kv"
    """How the router picks a decode worker: round_robin, random, least_loaded, kv."""
    weights: KVWeights = field(default_factory=KVWeights)
    """The kv policy's weights."""
    max_pending_prefill_tokens: int = RouterConfig.max_pending_prefill_tokens
    """A worker with this many prompt tokens waiting for their first token is full; when all are, the
    router holds new requests in its admission queue (the live router's `RouterConfig` default)."""
    block_size: int = 16
    """KV block size: the router counts prefix overlap and load in blocks."""
    seed: int = 0
    """The router's random choices (ties, the random policy)."""
    kv_bytes_per_token: int = 131_072
    """KV bytes per token moved to the decode worker (Llama-3.1-8B: 2 x 32 layers x 8 heads x 128 x 2 B)."""
    transfer_bytes_per_s: float = 40e9
    transfer_latency_s: float = 0.002
    startup_s: float = 30.0
    """A new worker's start-up (weights loaded, warmed) before it takes work."""
    flip_s: float = 1.0
    """A drained worker's role switch (no weight reload)."""
    refresh_s: float = 0.5
    """A decode worker recomputes its step time at least this often (its contexts grow)."""
    context_quantum: int = 32
    """Decode step times are looked up with the mean context rounded to this many tokens (1: exact)."""
    run_on_s: float = 600.0
    """After the last arrival, the run goes on at most this long for requests in flight."""

    def disagg_policy(self) -> DisaggPolicy:
        return DisaggPolicy(local_prefill_threshold=self.local_prefill_tokens,
                            max_prefill_queue_tokens=self.max_prefill_queue_tokens)
