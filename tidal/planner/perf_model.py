"""The planner's performance model: how many prefill and decode workers a load needs.

A `PerfModel` owns a step-time model (a measured `tidal.perf.profile.Profile`, or `LinearStepTimes`
with documented default coefficients) and two correction factors, one per pool. Lifecycle: built
once (`PerfModel.from_profile(profile)` or `PerfModel.default()`), then `observe(workers)` each
planner step folds the workers' measured step times into the corrections, and the sizing methods
read the corrected model. Invariant: each correction stays within
[`correction_min`, `correction_max`]; a correction c multiplies every predicted step time of its
pool (c = 1.5: steps run 50% slower than the model says).

Per-worker capacity, per pool:

- prefill: a worker runs steps of t prompt tokens, where t is the largest count (up to the
  profile's throughput knee, or `max_prefill_tokens`) whose step takes at most
  `prefill_ttft_fraction` of the TTFT target (the rest of the budget is queueing and KV transfer);
  it sustains t / (c_prefill x prefill_s(t)) tokens/s.
  prefill workers needed = rate x ISL x (1 - prefix_hit_rate) / that throughput.
- decode: B is the largest batch (up to `max_decode_batch`) whose step, c_decode x decode_s(B, ctx),
  fits the ITL target at the context ctx = ISL + OSL / 2 (a sequence halfway through its output).
  By Little's law a sequence stays OSL steps, so concurrent sequences = rate x OSL x step time, and
  decode workers needed = concurrent sequences / B.

Needs are returned unrounded; the planner applies its headroom and rounds up.
Pure arithmetic: no I/O, no clock, no engine imports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Protocol

from tidal.perf.profile import Profile
from tidal.planner.types import WorkerObservation


class StepTimes(Protocol):
    """What the model needs of a step-time source (`Profile` answers all three)."""

    def prefill_s(self, tokens: float) -> float: ...

    def decode_s(self, batch: float, context_len: float) -> float: ...

    def step_s(self, prefill_tokens: float, decode_seqs: float, decode_context_tokens: float) -> float: ...


@dataclass(frozen=True)
class LinearStepTimes:
    """A linear step-time formula (the same shape as `tidal.sim.timing.TimingModel`):

        step_s = base_s + prefill_s_per_token x prefill tokens + decode_s_per_seq x decode sequences
               + decode_s_per_kv_token x context tokens of those sequences

    The defaults are rough figures for a Llama-3.1-8B-shaped model in bf16 on one H100-class GPU, not
    measurements: 8 ms a step, 20k prefill tokens/s, 0.05 ms per decode sequence, 8 us per 1k
    context tokens read."""

    base_s: float = 0.008
    prefill_s_per_token: float = 1 / 20_000
    decode_s_per_seq: float = 0.00005
    decode_s_per_kv_token: float = 0.000008 / 1000

    def prefill_s(self, tokens: float) -> float:
        return self.step_s(tokens, 0, 0) if tokens > 0 else 0.0

    def decode_s(self, batch: float, context_len: float) -> float:
        return self.step_s(0, batch, batch * context_len)

    def step_s(self, prefill_tokens: float, decode_seqs: float, decode_context_tokens: float) -> float:
        return (self.base_s + self.prefill_s_per_token * prefill_tokens + self.decode_s_per_seq * decode_seqs
                + self.decode_s_per_kv_token * decode_context_tokens)


@dataclass(frozen=True)
class PerfModelConfig:
    prefill_ttft_fraction: float = 0.5
    """A prefill step may take at most this share of the TTFT target."""
    max_prefill_tokens: int = 16384
    """Largest prefill step considered when the step times give no knee (the linear model)."""
    max_decode_batch: int = 256
    """Largest decode batch considered (KV memory bounds it; a profile also caps it at its largest
    measured batch)."""
    correction_alpha: float = 0.3
    """Weight of the newest observed/predicted step-time ratio in each pool's correction (EWMA)."""
    correction_min: float = 0.5
    correction_max: float = 3.0


class PerfModel:
    def __init__(self, step_times: StepTimes, config: PerfModelConfig | None = None,
                 prefill_cap_tokens: int | None = None, max_decode_batch: int | None = None):
        self.step_times = step_times
        self.config = config or PerfModelConfig()
        self.prefill_cap_tokens = prefill_cap_tokens or self.config.max_prefill_tokens
        self.max_decode_batch = min(max_decode_batch or self.config.max_decode_batch, self.config.max_decode_batch)
        self.prefill_correction = 1.0
        self.decode_correction = 1.0
        self.kv_capacity_tokens = 0  # a decode worker's KV cache, as the workers report it (0: unknown)

    @classmethod
    def from_profile(cls, profile: Profile, config: PerfModelConfig | None = None) -> PerfModel:
        """Step times interpolated from a measured profile; prefill steps up to its throughput knee,
        decode batches up to its largest measured batch."""
        return cls(profile, config, prefill_cap_tokens=profile.prefill_knee_tokens(),
                   max_decode_batch=max(p.batch for p in profile.decode))

    @classmethod
    def default(cls, config: PerfModelConfig | None = None) -> PerfModel:
        """`LinearStepTimes()`: an 8B model on one H100-class GPU (rough, documented figures)."""
        return cls(LinearStepTimes(), config)

    # ---- per-worker capacity -------------------------------------------------------------------
    def prefill_step_tokens(self, ttft_ms: float) -> int:
        """The largest prefill step (tokens, >= 1) whose corrected time fits the TTFT share."""
        budget_s = self.config.prefill_ttft_fraction * ttft_ms / 1000
        return _largest_under(lambda t: self.prefill_correction * self.step_times.prefill_s(t),
                              budget_s, self.prefill_cap_tokens)

    def prefill_tokens_per_s(self, ttft_ms: float) -> float:
        """Prompt tokens per second one prefill worker sustains while TTFT stays under `ttft_ms`."""
        tokens = self.prefill_step_tokens(ttft_ms)
        return tokens / (self.prefill_correction * self.step_times.prefill_s(tokens))

    def decode_batch(self, itl_ms: float, context_len: float, kv_tokens_per_seq: float | None = None) -> int:
        """The largest decode batch (>= 1) whose corrected step time fits the ITL target and, when the
        workers report their KV capacity, whose sequences (`kv_tokens_per_seq` each) fit in it."""
        cap = self.max_decode_batch
        if self.kv_capacity_tokens and kv_tokens_per_seq:
            cap = max(1, min(cap, int(self.kv_capacity_tokens // kv_tokens_per_seq)))
        return _largest_under(lambda b: self.decode_step_s(b, context_len), itl_ms / 1000, cap)

    def decode_step_s(self, batch: float, context_len: float) -> float:
        return self.decode_correction * self.step_times.decode_s(batch, context_len)

    # ---- pool sizes (unrounded) ----------------------------------------------------------------
    def prefill_workers_needed(self, rate: float, isl: float, prefix_hit_rate: float, ttft_ms: float) -> float:
        """rate x ISL x (1 - prefix_hit_rate) / per-worker prefill tokens/s."""
        uncached_tokens_per_s = rate * isl * (1 - min(max(prefix_hit_rate, 0.0), 1.0))
        return uncached_tokens_per_s / self.prefill_tokens_per_s(ttft_ms)

    def decode_workers_needed(self, rate: float, isl: float, osl: float, itl_ms: float) -> float:
        """Concurrent sequences (rate x OSL x step time, Little's law) / the largest batch fitting ITL."""
        context_len = isl + osl / 2
        batch = self.decode_batch(itl_ms, context_len, isl + osl)
        concurrent = rate * osl * self.decode_step_s(batch, context_len)
        return concurrent / batch

    # ---- online correction ---------------------------------------------------------------------
    def observe(self, workers: Iterable[WorkerObservation]) -> None:
        """Fold each pool's measured step times into its correction: the step-weighted ratio of
        observed to predicted step time, smoothed by an EWMA and clamped. Prefill workers feed the
        prefill correction; decode and aggregated (`both`) workers the decode one. Workers that
        are not active or ran no steps are skipped."""
        observed = {"prefill": 0.0, "decode": 0.0}
        predicted = {"prefill": 0.0, "decode": 0.0}
        for w in workers:
            if w.role != "prefill" and w.kv_capacity_tokens:
                self.kv_capacity_tokens = w.kv_capacity_tokens
            if w.state != "active" or w.steps <= 0 or w.step_s_mean <= 0:
                continue
            model_s = self.step_times.step_s(w.prefill_tokens / w.steps, w.decode_batch_mean,
                                             w.decode_batch_mean * w.context_tokens_mean)
            if model_s <= 0:
                continue
            pool = "prefill" if w.role == "prefill" else "decode"
            observed[pool] += w.steps * w.step_s_mean
            predicted[pool] += w.steps * model_s
        if predicted["prefill"] > 0:
            self.prefill_correction = self._smoothed(self.prefill_correction, observed["prefill"] / predicted["prefill"])
        if predicted["decode"] > 0:
            self.decode_correction = self._smoothed(self.decode_correction, observed["decode"] / predicted["decode"])

    def _smoothed(self, current: float, ratio: float) -> float:
        a = self.config.correction_alpha
        return min(max((1 - a) * current + a * ratio, self.config.correction_min), self.config.correction_max)


def _largest_under(time_s, budget_s: float, cap: int) -> int:
    """The largest n in [1, cap] with time_s(n) <= budget_s (time_s rising in n); 1 when none fits."""
    if time_s(cap) <= budget_s:
        return cap
    lo, hi = 1, cap  # invariant: the answer lies in [lo, hi); time_s(hi) > budget_s
    if time_s(lo) > budget_s:
        return 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if time_s(mid) <= budget_s:
            lo = mid
        else:
            hi = mid
    return lo
