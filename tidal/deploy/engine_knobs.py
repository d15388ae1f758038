"""An engine's settings from the flat knobs a user writes (the YAML's `engine:` sections, or the
flags `add_model_flags`/`add_engine_flags` define and `model_knobs`/`engine_knobs_from_args` read):
`engine_config(knobs, role)`, with a prefill or decode worker's scheduler limits derived from a
profile (`resolve_role_limits`).

Used by every door a worker's settings come in by (the deployment YAML, `tidal serve` flags, the
cluster commands, the planner's flips), so a knob resolves the same way everywhere.
"""

from __future__ import annotations

import argparse
import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from tidal.config import (GIB, CacheConfig, EngineConfig, ModelConfig, ParallelConfig, RoleTuning,
                          RunnerConfig, SchedulerConfig, knob_fields)
from tidal.perf.profile import load_profile
from tidal.protocol import Role

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoleLimits:
    token_budget: int
    max_num_seqs: int
    derived: str | None = None
    """What came from a profile, and why, for the log; None when nothing did."""


def resolve_role_limits(role: Role, knobs: Mapping[str, object]) -> RoleLimits:
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
            raise ValueError(f"a decode worker tuned from a profile ({tuning.profile}) "
                             "needs engine.itl_target_ms")
        context_len = tuning.tuning_context_len
        max_num_seqs = load_profile(tuning.profile).max_decode_batch(tuning.itl_target_ms, context_len)
        derived = (f"max_num_seqs={max_num_seqs}, the largest batch of {tuning.profile} within "
                   f"itl_target_ms={tuning.itl_target_ms:g} at context {context_len}")
        if max_num_seqs > token_budget:
            derived += f" (but token_budget={token_budget} caps a step's batch lower)"
    return RoleLimits(token_budget, max_num_seqs, derived)


def engine_config(knobs: Mapping[str, object], role: Role = "both",
                  parallel: ParallelConfig = ParallelConfig(),
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


# ---- the command-line flags of the same knobs -------------------------------------------------
# Where `vllm serve` spells a knob differently, its spelling is a second name of the same flag
# (`--max-num-batched-tokens`, `--enforce-eager`, ...); vLLM flags Tidal has no knob for are
# refused with a pointer to Tidal's own (`tidal.deploy.vllm_flags`).
def add_model_flags(p: argparse.ArgumentParser, model_option: bool = False) -> None:
    """The model, its device and its KV cache: what `serve` and `profile` share."""
    from tidal.deploy.vllm_flags import add_refused_model_flags, vllm_dtype

    model_help = "GGUF file, Hugging Face folder or dummy:ARCH (default: embedded SmolLM2-135M-Instruct)"
    if model_option:
        p.add_argument("--model", default=None, help=model_help)
    else:
        p.add_argument("model", nargs="?", default=None, help=model_help)
    p.add_argument("--tokenizer", default=None, help="folder with tokenizer.json, or a .gguf file")
    p.add_argument("--device", default="cpu",
                   help="cpu or cuda[:N] (with -tp: the first of consecutive devices)")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="split the model over this many devices (cuda:N, cuda:N+1, ...), one process each")
    p.add_argument("--dtype", default=None, type=vllm_dtype, choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights and KV cache (vLLM's half and float mean float16 and float32)")
    p.add_argument("--quantization", "-q", default=None, type=str.lower, choices=["fp8", "int8", "int4"],
                   help="fp8: the decoder's linear weights in FP8 e4m3 (a scale per output row), quantized at "
                        "load (an FP8 checkpoint is served in FP8 without it); int8/int4: CPU weight-only "
                        "linears (int4 keeps a Q4 GGUF's blocks); other vLLM methods are refused")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--kv-cache-memory", type=float, default=None,
                   help=f"GiB for the KV cache (default {CacheConfig.kv_cache_memory_bytes / GIB:g})")
    p.add_argument("--gpu-memory-utilization", type=float, default=None, metavar="FRACTION",
                   help="CUDA: the KV cache fills this fraction of the device's memory less what the loaded "
                        "weights take (unlike vLLM, activations are not profiled: they, CUDA graphs and other "
                        "processes use the rest); instead of --kv-cache-memory")
    p.add_argument("--num-threads", type=int, default=None, help="torch threads (CPU)")
    p.add_argument("--attention-backend", default=None, choices=["auto", "torch", "triton"],
                   help="auto: the Triton kernels on CUDA, plain torch elsewhere")
    p.add_argument("--no-cuda-graphs", "--enforce-eager", action="store_true",
                   help="run decode steps eagerly on CUDA")
    add_refused_model_flags(p)


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    add_model_flags(p)
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None,
                   help="reuse the KV of shared prompt prefixes (default on)")
    p.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false", default=None,
                   help=argparse.SUPPRESS)
    p.add_argument("--token-budget", "--max-num-batched-tokens", type=int, default=None,
                   help=f"tokens per engine step (default {SchedulerConfig.token_budget})")
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help=f"requests running at once (default {SchedulerConfig.max_num_seqs})")
    p.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=None,
                   help="split long prompts over several steps (default on)")
    p.add_argument("--no-chunked-prefill", dest="enable_chunked_prefill", action="store_false", default=None,
                   help=argparse.SUPPRESS)


def model_knobs(args: argparse.Namespace) -> dict:
    """The engine knobs (`tidal.config.ENGINE_KNOBS`) `add_model_flags`' flags set; None: not given."""
    return {"dtype": args.dtype, "quantization": args.quantization, "max_model_len": args.max_model_len, "seed": args.seed,
            "block_size": args.block_size, "num_kv_blocks": args.num_kv_blocks,
            "kv_cache_memory_gib": args.kv_cache_memory, "gpu_memory_utilization": args.gpu_memory_utilization,
            "attention_backend": args.attention_backend,
            "enable_cuda_graphs": False if args.no_cuda_graphs else None}


def engine_knobs_from_args(args: argparse.Namespace) -> dict:
    """The engine knobs `add_engine_flags`' flags set; None: not given (the config's default)."""
    return {**model_knobs(args), "token_budget": args.token_budget, "max_num_seqs": args.max_num_seqs,
            "enable_prefix_caching": args.enable_prefix_caching,
            "enable_chunked_prefill": args.enable_chunked_prefill}
