"""Helpers for model tests: run a `LlamaModel` over a paged KV cache step by step.

`PagedSequences` owns a small KV cache and one block table per sequence (blocks handed out in a
scrambled order, so a wrong block lookup shows). `step` runs one mixed batch: decode tokens
first, then prefill chunks, as the model runner lays them out.
"""

from __future__ import annotations

import torch

import pytest

from tidal.kernels.paged_attention import AttentionMetadata, PrefillSpan
from tidal.models.llama import kv_cache_shape


class PagedSequences:
    def __init__(self, model, num_blocks: int = 64, block_size: int = 4):
        self.model = model
        self.block_size = block_size
        arch, dtype, device = model.arch, model.dtype, model.device
        shape = kv_cache_shape(arch, num_blocks, block_size, model.shard.size)  # this rank's kv heads
        self.kv_caches = [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                          for _ in range(arch.num_layers)]
        # Reversed and interleaved block ids: sequence i gets blocks that are neither 0.. nor contiguous.
        self._free = list(range(num_blocks - 1, 0, -1))
        self.block_tables: dict[str, list[int]] = {}
        self.num_tokens: dict[str, int] = {}  # tokens already in the cache

    def _ensure_blocks(self, name: str, num_tokens: int) -> list[int]:
        table = self.block_tables.setdefault(name, [])
        while len(table) * self.block_size < num_tokens:
            table.append(self._free.pop(0 if len(table) % 2 else -1))
        return table

    def _slots(self, table: list[int], start: int, end: int) -> list[int]:
        return [table[p // self.block_size] * self.block_size + p % self.block_size for p in range(start, end)]

    @torch.inference_mode()
    def step(self, decodes: dict[str, int], prefills: dict[str, list[int]]) -> dict[str, torch.Tensor]:
        """decodes: {seq: next token}; prefills: {seq: chunk of tokens}. Returns logits per sequence:
        [vocab] for a decode, [chunk_len, vocab] for a prefill chunk."""
        ids, positions, slots = [], [], []
        tables, lens = [], []
        for name, token in decodes.items():
            pos = self.num_tokens.get(name, 0)
            table = self._ensure_blocks(name, pos + 1)
            ids.append(token)
            positions.append(pos)
            slots += self._slots(table, pos, pos + 1)
            tables.append(table)
            lens.append(pos + 1)
        spans = []
        device = self.model.device
        for name, chunk in prefills.items():
            start = self.num_tokens.get(name, 0)
            end = start + len(chunk)
            table = self._ensure_blocks(name, end)
            spans.append(PrefillSpan(len(ids), len(ids) + len(chunk), end, torch.tensor(table, device=device)))
            ids += chunk
            positions += range(start, end)
            slots += self._slots(table, start, end)
        width = max((len(t) for t in tables), default=0)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, device=device),
            num_decode_tokens=len(decodes),
            decode_block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], device=device)
            if decodes else None,
            decode_context_lens=torch.tensor(lens, device=device) if decodes else None,
            decode_max_context_len=max(lens, default=0),
            prefills=spans)
        hidden = self.model(torch.tensor(ids, device=device), torch.tensor(positions, device=device),
                            self.kv_caches, meta)
        logits = self.model.compute_logits(hidden)
        out = {}
        for row, name in enumerate(decodes):
            out[name] = logits[row]
            self.num_tokens[name] += 1
        for span, (name, chunk) in zip(spans, prefills.items()):
            out[name] = logits[span.query_start:span.query_end]
            self.num_tokens[name] = self.num_tokens.get(name, 0) + len(chunk)
        return out


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run on one intra-op thread: on a busy 2-core machine, two OpenMP threads that wait for
    each other make every matmul 5-10x slower; one thread keeps these tests fast."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
