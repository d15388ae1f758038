"""The simulator's step-time models: how long an engine step takes, from what it runs.

`StepTimeModel` is what a simulated worker asks: `step_s(prefill_tokens, decode_seqs,
decode_context_tokens)`. Two models answer it: a measured `tidal.perf.profile.Profile` (`tidal sim
--profile FILE`; interpolated from `tidal profile`'s grids) and this module's `TimingModel`, a
linear formula with hand-set coefficients (`tidal sim --timing k=v,...`):

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
