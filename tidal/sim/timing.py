"""The simulator's step-time model: how long an engine step takes, from what it runs.

    step_s = base_s
           + prefill_s_per_token x prefill tokens               (matmul-bound: linear in tokens)
           + decode_s_per_seq x decode sequences                (per-sequence work: sampling, tokens)
           + decode_s_per_kv_token x context tokens of decodes   (attention reads the KV)

The defaults are rough figures for a Llama-3.1-8B-shaped model in bf16 on one H100-class GPU, not
measurements: 8 ms a step (weights read once per step), 20k prefill tokens/s, 0.05 ms per decode
sequence, 8 us per 1k context tokens read. `tidal profile` (issue 6) measures the real curve; a
profile file will replace these numbers.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TimingModel:
    base_s: float = 0.008
    prefill_s_per_token: float = 1 / 20_000
    decode_s_per_seq: float = 0.00005
    decode_s_per_kv_token: float = 0.000008 / 1000

    def step_s(self, prefill_tokens: int, decode_seqs: int, decode_context_tokens: int) -> float:
        return (self.base_s + self.prefill_s_per_token * prefill_tokens + self.decode_s_per_seq * decode_seqs
                + self.decode_s_per_kv_token * decode_context_tokens)
