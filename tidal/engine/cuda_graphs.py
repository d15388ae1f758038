"""Decode steps captured as CUDA graphs, one per batch size, replayed with each step's inputs.

Owns static input buffers sized for the largest captured batch, one static logits buffer, the
graphs and their shared memory pool. Lifecycle: the model runner builds and captures them once at
start, after the KV cache exists; `run` copies a decode-only batch into the static buffers, padded
up to the next captured size, and replays. Padding rows have context length 0 and slot -1, so
they read no key and write no KV. Invariant: a captured step reads only the static buffers, the
weights and the KV cache, and never reads a device value on the host; the decode kernel's
key-range split count is fixed per captured size.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from tidal.engine.batch import StepBatch

logger = logging.getLogger(__name__)


def graph_batch_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to `max_batch` (and `max_batch` itself)."""
    sizes = [s for s in (1, 2, 4, 8) if s <= max_batch] + list(range(16, max_batch + 1, 16))
    if sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sizes


class DecodeGraphs:
    def __init__(self, runner, max_batch: int, max_blocks_per_seq: int):
        from tidal.kernels.triton_attention import choose_num_splits

        self.runner = runner
        self.sizes = graph_batch_sizes(max_batch)
        self.max_blocks = max_blocks_per_seq
        device, largest = runner.device, self.sizes[-1]
        # Rows: token ids, positions, slots, context lengths.
        self.vectors = torch.zeros(4, largest, dtype=torch.int32, device=device)
        self.vectors[2].fill_(-1)
        self.block_tables = torch.zeros(largest, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.logits = torch.zeros(largest, runner.arch.vocab_size, dtype=torch.float32, device=device)
        # A long context is the case split-KV is for; the split count is fixed per captured size.
        self.num_splits = {size: choose_num_splits(size, runner.num_kv_heads, 8192, runner.num_sms)
                           for size in self.sizes}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}

    def can_run(self, batch: StepBatch) -> bool:
        return (batch.num_prefills == 0 and 0 < batch.num_decodes <= self.sizes[-1]
                and batch.decode_block_tables.shape[1] <= self.max_blocks)

    def _step(self, size: int) -> None:
        """The captured work: forward over the first `size` static rows, logits into the buffer."""
        runner = self.runner
        fields = StepBatch(
            input_ids=self.vectors[0, :size], positions=self.vectors[1, :size], slot_mapping=self.vectors[2, :size],
            decode_context_lens=self.vectors[3, :size], decode_block_tables=self.block_tables[:size],
            prefill_cu_query_lens=self.vectors[3, :1], prefill_context_lens=self.vectors[3, :0],
            prefill_block_tables=self.block_tables[:0], logits_rows=self.vectors[0, :0])
        meta = runner.attention_metadata(fields, fields, num_splits=self.num_splits[size])
        hidden = runner.model(fields.input_ids, fields.positions, runner.kv_caches, meta)
        self.logits[:size].copy_(runner.model.compute_logits(hidden))

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.perf_counter()
        pool = None
        for size in reversed(self.sizes):  # largest first, so smaller graphs fit in its pool
            self._step(size)  # eager warm-up: compiles the kernels for this shape
            torch.cuda.synchronize(self.runner.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._step(size)
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize(self.runner.device)
        logger.info("captured %d decode graphs (batch %d..%d) in %.1f s", len(self.sizes), self.sizes[0],
                    self.sizes[-1], time.perf_counter() - start)

    def run(self, batch: StepBatch) -> torch.Tensor | None:
        n = batch.num_decodes
        size = next(s for s in self.sizes if s >= n)
        host = np.zeros((4, size), dtype=np.int32)
        host[2] = -1
        host[0, :n], host[1, :n] = batch.input_ids, batch.positions
        host[2, :n], host[3, :n] = batch.slot_mapping, batch.decode_context_lens
        tables = batch.decode_block_tables
        device = self.runner.to_device(np.concatenate([host.reshape(-1), tables.reshape(-1), batch.logits_rows]))
        self.vectors[:, :size].copy_(device[:4 * size].view(4, size))
        width = tables.shape[1]
        self.block_tables[:n, :width].copy_(device[4 * size:4 * size + n * width].view(n, width))
        self.graphs[size].replay()
        if len(batch.logits_rows) == n:  # every decode samples (the usual case): rows 0..n-1
            return self.logits[:n]
        if not len(batch.logits_rows):
            return None
        return self.logits.index_select(0, device[4 * size + n * width:])
