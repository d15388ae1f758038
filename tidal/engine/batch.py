"""`StepBatch`: the host-side inputs of one forward pass, built from the scheduler's output.

It is plain int32 numpy arrays, so it travels as one buffer: one pinned host-to-device copy per
step, and one broadcast to the other ranks of a tensor-parallel group (`pack` / `unpack`).
Row order on the flat token axis: decode tokens first (one query each), then the prefill chunks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tidal.engine.scheduler import ScheduledRequest

_FIELDS = ("input_ids", "positions", "slot_mapping", "decode_context_lens", "decode_block_tables",
           "prefill_cu_query_lens", "prefill_context_lens", "prefill_block_tables", "logits_rows")


@dataclass
class StepBatch:
    input_ids: np.ndarray  # [T] token ids
    positions: np.ndarray  # [T]
    slot_mapping: np.ndarray  # [T] KV slot of each token
    decode_context_lens: np.ndarray  # [Nd] keys each decode query sees (its own included)
    decode_block_tables: np.ndarray  # [Nd, Bd] (rows padded with 0)
    prefill_cu_query_lens: np.ndarray  # [P + 1] chunk offsets, counted from the first prefill token
    prefill_context_lens: np.ndarray  # [P] tokens in the cache after the chunk
    prefill_block_tables: np.ndarray  # [P, Bp]
    logits_rows: np.ndarray  # [S] rows of the flat axis whose logits are sampled, in sampler order

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def num_decodes(self) -> int:
        return len(self.decode_context_lens)

    @property
    def num_prefills(self) -> int:
        return len(self.prefill_context_lens)

    @property
    def prefill_max_query_len(self) -> int:
        return int(np.diff(self.prefill_cu_query_lens).max()) if self.num_prefills else 0

    def pack(self) -> np.ndarray:
        """One int32 array: a header of the shapes, then every field flattened."""
        header = [self.num_tokens, self.num_decodes, self.decode_block_tables.shape[1], self.num_prefills,
                  self.prefill_block_tables.shape[1], len(self.logits_rows)]
        return np.concatenate([np.asarray(header, dtype=np.int32)]
                              + [getattr(self, name).reshape(-1) for name in _FIELDS])

    def shapes(self) -> list[tuple[int, ...]]:
        return [getattr(self, name).shape for name in _FIELDS]

    @classmethod
    def unpack(cls, packed: np.ndarray) -> StepBatch:
        """The inverse of `pack` (for a rank that received the buffer)."""
        t, nd, bd, p, bp, s = (int(x) for x in packed[:6])
        shapes = [(t,), (t,), (t,), (nd,), (nd, bd), (p + 1,), (p,), (p, bp), (s,)]
        return cls._view(packed, shapes)

    def view_of(self, packed) -> StepBatch:
        """The fields of `packed` (this batch's `pack()`, e.g. copied to a device), read with this
        batch's shapes, so no device value is read on the host."""
        return self._view(packed, self.shapes())

    @classmethod
    def _view(cls, packed, shapes) -> StepBatch:
        fields, offset = {}, 6
        for name, shape in zip(_FIELDS, shapes):
            size = math.prod(shape)
            fields[name] = packed[offset:offset + size].reshape(shape)
            offset += size
        return cls(**fields)


def build_step_batch(decodes: list[ScheduledRequest], prefills: list[ScheduledRequest],
                     block_size: int) -> StepBatch:
    """The flat batch of one step: `decodes` (one new token each) then `prefills` (chunks)."""
    bs = block_size
    nd, npf = len(decodes), len(prefills)
    dec_pos = np.fromiter((s.request.num_computed_tokens for s in decodes), dtype=np.int32, count=nd)
    dec_blocks = dec_pos // bs + 1
    dec_tables = np.zeros((nd, int(dec_blocks.max()) if nd else 0), dtype=np.int32)
    tokens = np.empty(nd + sum(s.num_new_tokens for s in prefills), dtype=np.int32)
    for row, s in enumerate(decodes):
        dec_tables[row, :dec_blocks[row]] = s.block_ids[:dec_blocks[row]]
        tokens[row] = s.request.all_token_ids[dec_pos[row]]
    positions = [dec_pos]
    slots = [dec_tables[np.arange(nd), dec_pos // bs] * bs + dec_pos % bs]
    cu = np.zeros(npf + 1, dtype=np.int32)
    ctx = np.zeros(npf, dtype=np.int32)
    pf_blocks = [math.ceil((s.request.num_computed_tokens + s.num_new_tokens) / bs) for s in prefills]
    pf_tables = np.zeros((npf, max(pf_blocks, default=0)), dtype=np.int32)
    for i, s in enumerate(prefills):
        nc, n = s.request.num_computed_tokens, s.num_new_tokens
        pos = np.arange(nc, nc + n, dtype=np.int32)
        pf_tables[i, :pf_blocks[i]] = s.block_ids[:pf_blocks[i]]
        tokens[nd + cu[i]:nd + cu[i] + n] = s.request.all_token_ids[nc:nc + n]
        positions.append(pos)
        slots.append(pf_tables[i, pos // bs] * bs + pos % bs)
        cu[i + 1], ctx[i] = cu[i] + n, nc + n
    rows = [row for row, s in enumerate(decodes) if s.samples]
    rows += [nd + int(cu[i + 1]) - 1 for i, s in enumerate(prefills) if s.samples]
    return StepBatch(input_ids=tokens, positions=np.concatenate(positions), slot_mapping=np.concatenate(slots),
                     decode_context_lens=dec_pos + 1, decode_block_tables=dec_tables,
                     prefill_cu_query_lens=cu, prefill_context_lens=ctx, prefill_block_tables=pf_tables,
                     logits_rows=np.asarray(rows, dtype=np.int32))
