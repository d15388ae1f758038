"""`tidal profile`: measure engine step times over a grid, on a real engine, into a `Profile`.

`Sweep` owns one `EngineCore` built for measuring (`measuring_config`: prefix caching off, so no
prompt hits the cache; a token budget that prefills the largest prefill point in one step and is at
least twice the largest decode batch; a sequence cap that fits the largest decode batch) and drives
it alone. Every point starts and ends with no request in the engine and no KV block in use
(checked), so points don't disturb each other.

- prefill point N: prompts of random token ids totalling N tokens (one prompt, or equal ones when N
  exceeds the model's context), max_tokens=1; time the one step that prefills them all (they sample
  their token and finish in it). `warmup` untimed repeats, then the median of `repeats`.
- decode point (B, C): B prompts of C random tokens, prefilled untimed (in as many steps as the
  budget needs); `warmup` decode steps, then the median of `decode_steps` timed steps that each
  decode all B; then every request is aborted. Requests that finish their prefill early decode
  while the others prefill, so contexts run up to B x C / (token_budget - B) tokens (a fraction
  B / (token_budget - B) of C: 1.6% at the defaults) past C; the point is recorded at C.

A point whose KV does not fit in the cache, or whose sequences would outgrow the model's context,
is recorded as skipped, with the reason. A time is wall-clock around `engine.step()`, which ends
with the sampled tokens on the host; on CUDA, `torch.cuda.synchronize()` brackets it as well.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from statistics import median

import numpy as np
import torch

import tidal
from tidal.config import EngineConfig
from tidal.engine.engine import EngineCore
from tidal.engine.factory import build_engine
from tidal.perf.profile import DecodePoint, PrefillPoint, Profile, SkippedPoint
from tidal.protocol import AddRequest, SamplingParams, TokenDelta

logger = logging.getLogger(__name__)

DEFAULT_PREFILL_TOKENS = (128, 256, 512, 1024, 2048, 4096, 8192, 16384)
DEFAULT_DECODE_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
DEFAULT_DECODE_CONTEXTS = (512, 1024, 2048, 4096, 8192)
MIN_MAX_NUM_SEQS = 32  # room for the prompts of a prefill point split past the model's context


class SweepError(RuntimeError):
    """The engine did something a measurement can't use (a step that did not run what it should)."""


@dataclass(frozen=True)
class SweepConfig:
    prefill_tokens: tuple[int, ...] = DEFAULT_PREFILL_TOKENS
    """Prefill points: tokens prefilled in one step."""
    decode_batches: tuple[int, ...] = DEFAULT_DECODE_BATCHES
    """Decode points: sequences per step, for each of `decode_contexts`."""
    decode_contexts: tuple[int, ...] = DEFAULT_DECODE_CONTEXTS
    """Decode points: context tokens of each sequence."""
    warmup: int = 1
    """Untimed runs of each point first (kernel compilation, allocator, caches)."""
    repeats: int = 3
    """Timed prefill steps per point; the median is kept."""
    decode_steps: int = 5
    """Timed decode steps per point; the median is kept."""
    seed: int = 0
    """Seed of the random prompts."""


def measuring_config(engine: EngineConfig, sweep: SweepConfig) -> EngineConfig:
    """`engine` with the scheduler and cache settings a sweep needs (its model and KV size kept)."""
    largest_batch = max(sweep.decode_batches, default=1)
    scheduler = dataclasses.replace(
        engine.scheduler, token_budget=max(max(sweep.prefill_tokens, default=1), 2 * largest_batch),
        max_num_seqs=max(largest_batch, MIN_MAX_NUM_SEQS), enable_chunked_prefill=True)
    return engine.replace(scheduler=scheduler, cache=dataclasses.replace(engine.cache, enable_prefix_caching=False))


def run_profile(engine_config: EngineConfig, sweep: SweepConfig = SweepConfig()) -> Profile:
    """Build an engine for `engine_config`, sweep it, and return the profile."""
    engine = build_engine(measuring_config(engine_config, sweep))
    try:
        prefill, decode, skipped = Sweep(engine, sweep).run()
    finally:
        engine.close()
    for kind, points in (("prefill", prefill), ("decode", decode)):
        if not points:
            reasons = sorted({s.reason for s in skipped if s.kind == kind})
            raise SweepError(f"no {kind} point could be measured: {'; '.join(reasons) or 'the grid is empty'}")
    device = engine.runner.device
    return Profile(model=engine_config.model.model or engine.model_name, device=str(device),
                   device_name=device_name(device), dtype=str(engine.runner.dtype).removeprefix("torch."),
                   block_size=engine.kv.block_size, num_kv_blocks=engine.kv.num_blocks,
                   created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   tidal_version=tidal.__version__, prefill=tuple(prefill), decode=tuple(decode),
                   skipped=tuple(skipped))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.machine()}, torch threads={torch.get_num_threads()})"


class Sweep:
    def __init__(self, engine: EngineCore, config: SweepConfig) -> None:
        self.engine = engine
        self.config = config
        self.rng = np.random.default_rng(config.seed)
        self.sync = engine.runner.device.type == "cuda"
        self.next_id = 0

    def run(self) -> tuple[list[PrefillPoint], list[DecodePoint], list[SkippedPoint]]:
        measured: list = []
        for tokens in sorted(self.config.prefill_tokens):
            measured.append(self.prefill_point(tokens))
        for context_len in sorted(self.config.decode_contexts):
            for batch in sorted(self.config.decode_batches):
                measured.append(self.decode_point(batch, context_len))
        return ([p for p in measured if isinstance(p, PrefillPoint)],
                [p for p in measured if isinstance(p, DecodePoint)],
                [p for p in measured if isinstance(p, SkippedPoint)])

    # ---- points --------------------------------------------------------------------------------
    def prefill_point(self, tokens: int) -> PrefillPoint | SkippedPoint:
        lengths = _split(tokens, self.engine.max_model_len - 1)
        bs = self.engine.kv.block_size
        reason = self._no_room(sum(-(-n // bs) for n in lengths), len(lengths))
        if reason is not None:
            return _skip(SkippedPoint("prefill", reason, tokens=tokens))
        times = []
        for i in range(self.config.warmup + self.config.repeats):
            request_ids = self._add(lengths, max_tokens=1)
            step_s, deltas = self._timed_step()
            if {d.request_id for d in deltas if d.finished} != set(request_ids):
                raise SweepError(f"the prefill of {tokens} tokens did not finish in one step")
            self._check_idle()
            if i >= self.config.warmup:
                times.append(step_s)
        point = PrefillPoint(tokens=tokens, step_s=median(times), num_prompts=len(lengths))
        logger.info("prefill %6d tokens: %8.2f ms  %9.0f tokens/s", tokens, point.step_s * 1000, point.tokens_per_s)
        return point

    def decode_point(self, batch: int, context_len: int) -> DecodePoint | SkippedPoint:
        steps = self.config.warmup + self.config.decode_steps
        # Prefill steps: prefilled requests decode (one token each) while the others use the rest.
        drift = -(-batch * context_len // (self.engine.scheduler.config.token_budget - batch)) + 1
        max_tokens = drift + steps + 2  # no request may finish while steps are timed
        total = context_len + max_tokens
        reason = None
        if total > self.engine.max_model_len:
            reason = f"context {context_len} + {max_tokens} tokens exceeds max_model_len {self.engine.max_model_len}"
        reason = reason or self._no_room(batch * -(-total // self.engine.kv.block_size), batch)
        if reason is not None:
            return _skip(SkippedPoint("decode", reason, batch=batch, context_len=context_len))
        request_ids = self._add([context_len] * batch, max_tokens=max_tokens)
        self._prefill(request_ids, max_steps=drift + 1)
        times = []
        for i in range(steps):
            step_s, deltas = self._timed_step()
            if sum(1 for d in deltas if d.new_token_ids) != batch or any(d.finished for d in deltas):
                raise SweepError(f"a decode step of batch {batch} at context {context_len} did not decode "
                                 f"every sequence once: {_errors(deltas) or 'preempted or finished early'}")
            if i >= self.config.warmup:
                times.append(step_s)
        self._abort(request_ids)
        point = DecodePoint(batch=batch, context_len=context_len, step_s=median(times))
        logger.info("decode batch %4d x context %6d: %8.2f ms", batch, context_len, point.step_s * 1000)
        return point

    # ---- engine driving ------------------------------------------------------------------------
    def _add(self, lengths: list[int], max_tokens: int) -> list[str]:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        request_ids = []
        for n in lengths:
            request_id = f"profile-{self.next_id}"
            self.next_id += 1
            prompt = self.rng.integers(0, self.engine.vocab_size, size=n).tolist()
            self.engine.add_request(AddRequest(request_id=request_id, prompt_token_ids=prompt, sampling_params=params))
            request_ids.append(request_id)
        return request_ids

    def _timed_step(self) -> tuple[float, list[TokenDelta]]:
        if self.sync:
            torch.cuda.synchronize(self.engine.runner.device)
        start = time.perf_counter()
        deltas = self.engine.step()
        if self.sync:
            torch.cuda.synchronize(self.engine.runner.device)
        step_s = time.perf_counter() - start
        errors = _errors(deltas)
        if errors:
            raise SweepError(f"the engine refused a profiling request: {errors}")
        return step_s, deltas

    def _prefill(self, request_ids: list[str], max_steps: int) -> None:
        """Step (untimed) until every request has its first token."""
        waiting = set(request_ids)
        for _ in range(max_steps + 1):
            _, deltas = self._timed_step()
            waiting -= {d.request_id for d in deltas if d.new_token_ids}
            if not waiting:
                return
        raise SweepError(f"{len(waiting)} of {len(request_ids)} prompts were not prefilled in {max_steps} steps")

    def _abort(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.engine.abort_request(request_id)
        self.engine.step()  # hands out the aborted requests' last deltas
        self._check_idle()

    def _check_idle(self) -> None:
        if self.engine.scheduler.has_unfinished() or self.engine.kv.num_used_blocks:
            raise SweepError(f"after a point the engine still holds {len(self.engine.scheduler.requests)} "
                             f"requests and {self.engine.kv.num_used_blocks} KV blocks")

    def _no_room(self, num_blocks: int, num_seqs: int) -> str | None:
        if num_blocks > self.engine.kv.num_blocks:
            return (f"needs {num_blocks} KV blocks, the cache holds {self.engine.kv.num_blocks} "
                    f"(--kv-cache-memory or --num-kv-blocks sets its size)")
        max_num_seqs = self.engine.scheduler.config.max_num_seqs
        if num_seqs > max_num_seqs:
            return f"{num_seqs} sequences, over the sweep engine's max_num_seqs {max_num_seqs}"
        return None


def _split(tokens: int, max_prompt_len: int) -> list[int]:
    """`tokens` as the fewest prompts of at most `max_prompt_len` tokens, as equal as can be."""
    count = -(-tokens // max_prompt_len)
    base, extra = divmod(tokens, count)
    return [base + 1] * extra + [base] * (count - extra)


def _errors(deltas: list[TokenDelta]) -> str:
    return "; ".join(sorted({d.error for d in deltas if d.error}))


def _skip(point: SkippedPoint) -> SkippedPoint:
    where = (f"{point.tokens} tokens" if point.kind == "prefill"
             else f"batch {point.batch} x context {point.context_len}")
    logger.info("%s %s skipped: %s", point.kind, where, point.reason)
    return point
