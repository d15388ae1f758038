"""Tensors for one step: builds the flat batch, runs the model, samples.

Owns the model and the KV cache: one tensor of `KVLayout.shape`
([num_layers, 2, num_kv_heads, num_blocks, block_size, head_dim]), allocated by the caller (the
KV transfer backend, so peers can reach it) or here, and seen by the model as one (k, v) pair of
[num_kv_heads, num_blocks, block_size, head_dim] views per layer. Stateless between steps apart
from those: every step's inputs are rebuilt from the scheduler's output.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from tidal.config import EngineConfig
from tidal.engine.sampler import SamplingBatch, sample
from tidal.engine.scheduler import ScheduledRequest, SchedulerOutput
from tidal.kernels.paged_attention import AttentionMetadata, PrefillSpan
from tidal.models.llama import kv_bytes_per_token
from tidal.models.loader import LoadedModel
from tidal.protocol import KVLayout, TokenLogprob


def kv_layout(config: EngineConfig, loaded: LoadedModel) -> KVLayout:
    """The KV cache this engine needs: `cache.num_blocks`, or as many as the memory allows."""
    arch, block_size = loaded.arch, config.cache.block_size
    num_blocks = config.cache.num_blocks or max(
        1, config.cache.kv_cache_memory_bytes // (block_size * kv_bytes_per_token(arch, loaded.dtype)))
    return KVLayout(num_layers=arch.num_layers, num_kv_heads=arch.num_kv_heads, num_blocks=num_blocks,
                    block_size=block_size, head_dim=arch.head_dim,
                    dtype=str(loaded.dtype).removeprefix("torch."))


class ModelRunner:
    def __init__(self, config: EngineConfig, loaded: LoadedModel, layout: KVLayout,
                 cache: torch.Tensor | None = None):
        self.model = loaded.model
        self.arch = loaded.arch
        self.device = torch.device(loaded.device)
        self.dtype = loaded.dtype
        self.block_size = layout.block_size
        self.num_blocks = layout.num_blocks
        if cache is None:
            cache = torch.zeros(layout.shape, dtype=self.dtype, device=self.device)
        assert tuple(cache.shape) == layout.shape and cache.dtype == self.dtype, (cache.shape, layout)
        self.cache = cache
        self.kv_caches = [(cache[i, 0], cache[i, 1]) for i in range(layout.num_layers)]

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, eos_token_ids: frozenset[int]
                ) -> tuple[dict[str, int], dict[str, TokenLogprob]]:
        """Run one step; returns the sampled token (and logprobs) of each request that samples."""
        decodes = [s for s in out.scheduled if s.num_new_tokens == 1]
        prefills = [s for s in out.scheduled if s.num_new_tokens > 1]
        ordered = decodes + prefills
        input_ids, positions, meta, logits_rows = self._prepare(decodes, prefills)
        hidden = self.model(input_ids, positions, self.kv_caches, meta)
        samplers = [s for s, row in zip(ordered, logits_rows) if row >= 0]
        if not samplers:
            return {}, {}
        rows = torch.tensor([row for row in logits_rows if row >= 0], device=self.device)
        logits = self.model.compute_logits(hidden[rows])
        batch = SamplingBatch(
            params=[s.request.sampling_params for s in samplers],
            generators=[s.request.generator for s in samplers],
            banned_token_ids=_banned(samplers, eos_token_ids))
        token_ids, logprobs = sample(logits, batch)
        sampled = {s.request.request_id: t for s, t in zip(samplers, token_ids)}
        sampled_logprobs = {s.request.request_id: lp for s, lp in zip(samplers, logprobs) if lp is not None}
        return sampled, sampled_logprobs

    def _prepare(self, decodes: list[ScheduledRequest], prefills: list[ScheduledRequest]):
        bs = self.block_size
        tokens: list[int] = []
        position_parts: list[np.ndarray] = []
        logits_rows: list[int] = []
        nd = len(decodes)
        # Decode tokens first: one query each, keys from a padded block table.
        dec_pos = np.fromiter((s.request.num_computed_tokens for s in decodes), dtype=np.int64, count=nd)
        max_blocks = int(dec_pos.max()) // bs + 1 if nd else 0
        dec_tables = np.zeros((nd, max_blocks), dtype=np.int64)
        for row, s in enumerate(decodes):
            num = int(dec_pos[row]) // bs + 1
            dec_tables[row, :num] = s.block_ids[:num]
            tokens.append(s.request.all_token_ids[int(dec_pos[row])])
            logits_rows.append(row if s.samples else -1)
        slot_parts = [dec_tables[np.arange(nd), dec_pos // bs] * bs + dec_pos % bs] if nd else []
        position_parts.append(dec_pos)
        spans = []
        start = nd
        for s in prefills:
            nc, n = s.request.num_computed_tokens, s.num_new_tokens
            pos = np.arange(nc, nc + n, dtype=np.int64)
            table = np.asarray(s.block_ids[:math.ceil((nc + n) / bs)], dtype=np.int64)
            tokens.extend(s.request.all_token_ids[nc:nc + n])
            position_parts.append(pos)
            slot_parts.append(table[pos // bs] * bs + pos % bs)
            spans.append(PrefillSpan(start, start + n, nc + n, torch.from_numpy(table).to(self.device)))
            logits_rows.append(start + n - 1 if s.samples else -1)
            start += n
        to_dev = lambda a: torch.from_numpy(a).to(self.device, non_blocking=True)  # noqa: E731
        meta = AttentionMetadata(
            slot_mapping=to_dev(np.concatenate(slot_parts)),
            num_decode_tokens=nd,
            decode_block_tables=to_dev(dec_tables) if nd else None,
            decode_context_lens=to_dev(dec_pos + 1) if nd else None,
            decode_max_context_len=int(dec_pos.max()) + 1 if nd else 0,
            prefills=spans)
        input_ids = torch.tensor(tokens, dtype=torch.int64, device=self.device)
        positions = to_dev(np.concatenate(position_parts))
        return input_ids, positions, meta, logits_rows


def _banned(samplers: list[ScheduledRequest], eos_token_ids: frozenset[int]) -> list[list[int]] | None:
    """Stop and eos ids may not be sampled before a request's min_tokens."""
    banned = []
    for s in samplers:
        params = s.request.sampling_params
        if s.request.num_output_tokens < params.min_tokens:
            ids = list(params.stop_token_ids) + ([] if params.ignore_eos else list(eos_token_ids))
            banned.append(ids)
        else:
            banned.append([])
    return banned if any(banned) else None
