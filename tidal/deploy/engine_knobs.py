"""An engine's settings from the flat knobs a user writes: `engine_config(knobs, role)`, with a
prefill or decode worker's scheduler limits derived from a profile (`resolve_role_limits`).

Used by every door a worker's settings come in by (the deployment YAML, `tidal serve` flags, the
cluster commands, the planner's flips), so a knob resolves the same way everywhere.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from tidal.config import (CacheConfig, EngineConfig, ModelConfig, ParallelConfig, RoleTuning, RunnerConfig,
                          SchedulerConfig, knob_fields)
from tidal.perf.profile import load_profile

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoleLimits:
    token_budget: int
    max_num_seqs: int
    derived: str | None = None
    """What came from a profile, and why, for the log; None when nothing did."""


def resolve_role_limits(role: str, knobs: Mapping[str, object]) -> RoleLimits:
    """A worker's token_budget and max_num_seqs from its engine knobs. Explicit settings win; else,
    with a profile (`RoleTuning`):
    - prefill: token_budget = the profile's prefill knee, the smallest batch that saturates the
      device (larger ones add TTFT for little throughput);
    - decode: max_num_seqs = the largest batch whose decode step, at `tuning_context_len` tokens of
      context, stays within `itl_target_ms`;
    else (and for role `both`) the `SchedulerConfig` defaults. Raises ValueError for an unreadable
    profile, a decode worker without itl_target_ms, or a target that even batch 1 misses."""
    scheduler = SchedulerConfig(**knob_fields(SchedulerConfig, knobs))
    tuning = RoleTuning(**knob_fields(RoleTuning, knobs))
    token_budget, max_num_seqs, derived = scheduler.token_budget, scheduler.max_num_seqs, None
    if tuning.profile is not None and role == "prefill" and knobs.get("token_budget") is None:
        token_budget = load_profile(tuning.profile).prefill_knee_tokens()
        derived = f"token_budget={token_budget}, the prefill knee of {tuning.profile}"
    elif tuning.profile is not None and role == "decode" and knobs.get("max_num_seqs") is None:
        if tuning.itl_target_ms is None:
            raise ValueError(f"a decode worker tuned from a profile ({tuning.profile}) needs engine.itl_target_ms")
        context_len = tuning.tuning_context_len
        max_num_seqs = load_profile(tuning.profile).max_decode_batch(tuning.itl_target_ms, context_len)
        derived = (f"max_num_seqs={max_num_seqs}, the largest batch of {tuning.profile} within "
                   f"itl_target_ms={tuning.itl_target_ms:g} at context {context_len}")
        if max_num_seqs > token_budget:
            derived += f" (but token_budget={token_budget} caps a step's batch lower)"
    return RoleLimits(token_budget, max_num_seqs, derived)


def engine_config(knobs: Mapping[str, object], role: str = "both", parallel: ParallelConfig = ParallelConfig(),
                  **model: object) -> EngineConfig:
    """The `EngineConfig` of a worker of `role` from its engine knobs (`ENGINE_KNOBS`; None: the
    default) and its `ModelConfig` fields other than the knobs' (model, tokenizer, device, ...)."""
    limits = resolve_role_limits(role, knobs)
    if limits.derived:
        _log_once(f"{role} workers: {limits.derived}")
    scheduler = SchedulerConfig(**{**knob_fields(SchedulerConfig, knobs), "token_budget": limits.token_budget,
                                   "max_num_seqs": limits.max_num_seqs})
    return EngineConfig(model=ModelConfig(**model, **knob_fields(ModelConfig, knobs)),
                        cache=CacheConfig(**knob_fields(CacheConfig, knobs)), scheduler=scheduler,
                        runner=RunnerConfig(**knob_fields(RunnerConfig, knobs)), parallel=parallel)


@functools.cache
def _log_once(message: str) -> None:
    logger.info(message)
