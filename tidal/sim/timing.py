"""The simulator's step-time models: how long an engine step takes, from what it runs.

`StepTimeModel` is what a simulated worker asks: `step_s(prefill_tokens, decode_seqs,
decode_context_tokens)`. Two models answer it: a measured `tidal.perf.profile.Profile` (`tidal sim
--profile FILE`; interpolated from `tidal profile`'s grids) and this module's `TimingModel`, a
linear formula with hand-set coefficients (`tidal sim --timing k=v,...`; `CachedSteps` memoises
either for the fleet simulator):

    step_s = base_s
           + prefill_s_per_token x prefill tokens               (matmul-bound: linear in tokens)
           + decode_s_per_seq x decode sequences                (per-sequence work: sampling, tokens)
           + decode_s_per_kv_token x context tokens of decodes   (attention reads the KV)

The defaults are rough figures for a Llama-3.1-8B-shaped model in bf16 on one H100-class GPU, not
measurements: 8 ms a step (weights read once per step), 20k prefill tokens/s, 0.05 ms per decode
sequence, 8 us per 1k context tokens read. A profile measures the real curve.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class StepTimeModel(Protocol):
    def step_s(self, prefill_tokens: int, decode_seqs: int, decode_context_tokens: int) -> float:
        """Seconds for one step that prefills `prefill_tokens` tokens and decodes one token of each
        of `decode_seqs` sequences, whose contexts hold `decode_context_tokens` tokens in all."""
        ...


@dataclass(frozen=True)
class TimingModel:
    base_s: float = 0.008
    prefill_s_per_token: float = 1 / 20_000
    decode_s_per_seq: float = 0.00005
    decode_s_per_kv_token: float = 0.000008 / 1000

    def step_s(self, prefill_tokens: int, decode_seqs: int, decode_context_tokens: int) -> float:
        return (self.base_s + self.prefill_s_per_token * prefill_tokens + self.decode_s_per_seq * decode_seqs
                + self.decode_s_per_kv_token * decode_context_tokens)


class CachedSteps:
    """A step-time model's answers memoised, the mean decode context rounded to `context_quantum`
    tokens (profile interpolation is the fleet simulator's hottest call otherwise)."""

    def __init__(self, model: StepTimeModel, context_quantum: int = 32):
        self.model = model
        self.quantum = context_quantum
        self._cache: dict[tuple[int, int, int], float] = {}

    def step_s(self, prefill_tokens: int, decode_seqs: int, decode_context_tokens: int) -> float:
        mean_q = round(decode_context_tokens / decode_seqs / self.quantum) if decode_seqs else 0
        key = (prefill_tokens, decode_seqs, mean_q)
        value = self._cache.get(key)
        if value is None:
            value = self.model.step_s(prefill_tokens, decode_seqs, mean_q * self.quantum * decode_seqs)
            self._cache[key] = value
        return value
