"""Tensors for one step: builds the flat batch, runs the model, samples.

Owns the model and the KV cache: one tensor of `KVLayout.shape`
([num_layers, 2, num_kv_heads, num_blocks, block_size, head_dim]), allocated by the caller (the
KV transfer backend, so peers can reach it) or here, and seen by the model as one (k, v) pair of
[num_kv_heads, num_blocks, block_size, head_dim] views per layer. Stateless between steps apart
from those: every step's inputs are rebuilt from the scheduler's output.

Tensor parallel: every rank has a runner over its shard and its part of the KV cache
(num_kv_heads / tp_size heads). Rank 0's `execute` hands each step's packed batch to `on_step` (the
broadcast to the other ranks) before its own `forward`; the others call `forward` on what they
receive, so every rank runs the same forwards (eager or graph) in the same order.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from tidal.config import EngineConfig
from tidal.engine.batch import StepBatch, build_step_batch
from tidal.engine.cuda_graphs import DecodeGraphs
from tidal.engine.logits_processors import adjust_logits
from tidal.engine.sampler import SamplingBatch, sample
from tidal.engine.scheduler import ScheduledRequest, SchedulerOutput
from tidal.engine.structured_output import StructuredOutputs
from tidal.kernels.attention import resolve_backend
from tidal.kernels.paged_attention import AttentionMetadata, PrefillSpan
from tidal.models.llama import kv_bytes_per_token
from tidal.models.loader import LoadedModel
from tidal.protocol import KVLayout, TokenLogprob


def kv_layout(config: EngineConfig, loaded: LoadedModel) -> KVLayout:
    """The KV cache this engine (this rank of it) needs: `cache.num_blocks`, or as many as the memory allows."""
    arch, block_size, tp_size = loaded.arch, config.cache.block_size, config.parallel.tensor_parallel_size
    num_blocks = config.cache.num_blocks or max(
        1, kv_cache_bytes(config, loaded) // (block_size * kv_bytes_per_token(arch, loaded.dtype, tp_size)))
    return KVLayout(num_layers=arch.num_layers, num_kv_heads=arch.num_kv_heads // tp_size, num_blocks=num_blocks,
                    block_size=block_size, head_dim=arch.head_dim,
                    dtype=str(loaded.dtype).removeprefix("torch."))


def kv_cache_bytes(config: EngineConfig, loaded: LoadedModel) -> int:
    """The memory the KV cache may take: `cache.kv_cache_memory_bytes`, or with
    `cache.gpu_memory_utilization` that fraction of the CUDA device's total memory less what this
    process holds after loading the weights. This process's own allocations (not the device's free
    memory, which other processes change) keep tensor-parallel ranks on equal devices equal."""
    utilization = config.cache.gpu_memory_utilization
    if utilization is None:
        return config.cache.kv_cache_memory_bytes
    device = torch.device(loaded.device)
    if device.type != "cuda":
        raise ValueError("gpu_memory_utilization sizes the KV cache of a CUDA device; on "
                         f"{device.type} set kv_cache_memory_gib (--kv-cache-memory) instead")
    total = torch.cuda.get_device_properties(device).total_memory
    held = torch.cuda.memory_allocated(device)
    budget = int(utilization * total) - held
    if budget <= 0:
        raise ValueError(f"gpu_memory_utilization={utilization:g} of {total / 2**30:.1f} GiB leaves nothing "
                         f"for the KV cache: the weights already take {held / 2**30:.1f} GiB")
    return budget


class ModelRunner:
    def __init__(self, config: EngineConfig, loaded: LoadedModel, layout: KVLayout,
                 cache: torch.Tensor | None = None, on_step: Callable[[np.ndarray], None] | None = None,
                 structured: StructuredOutputs | None = None):
        self.model = loaded.model
        self.structured = structured  # grammar masks of structured-output requests (rank 0's engine)
        self.arch = loaded.arch
        self.on_step = on_step  # tensor-parallel rank 0: send the packed step to the other ranks
        self.num_kv_heads = layout.num_kv_heads  # this rank's
        self.device = torch.device(loaded.device)
        self.dtype = loaded.dtype
        self.block_size = layout.block_size
        self.num_blocks = layout.num_blocks
        if cache is None:
            cache = torch.zeros(layout.shape, dtype=self.dtype, device=self.device)
        assert tuple(cache.shape) == layout.shape and cache.dtype == self.dtype, (cache.shape, layout)
        self.cache = cache
        self.kv_caches = [(cache[i, 0], cache[i, 1]) for i in range(layout.num_layers)]
        self.backend = resolve_backend(config.runner.attention_backend, self.device)
        self.num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count \
            if self.device.type == "cuda" else 1
        self.sample_vocab_size: int | None = None  # sample only ids below this (a dummy model's tokenizer)
        self._staging: torch.Tensor | None = None  # pinned int32 host buffer of `to_device`
        self._staging_done = torch.cuda.Event() if self.device.type == "cuda" else None
        self.graphs: DecodeGraphs | None = None
        max_graph_batch = min(config.runner.cuda_graph_max_batch, config.scheduler.max_num_seqs)
        if self.backend == "triton" and config.runner.enable_cuda_graphs and max_graph_batch > 0:
            self.graphs = DecodeGraphs(self, max_graph_batch, math.ceil(loaded.max_model_len / self.block_size))
            self.graphs.capture()

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, eos_token_ids: frozenset[int]
                ) -> tuple[dict[str, int], dict[str, TokenLogprob]]:
        """Run one step; returns the sampled token (and logprobs) of each request that samples."""
        decodes = [s for s in out.scheduled if s.num_new_tokens == 1]
        prefills = [s for s in out.scheduled if s.num_new_tokens > 1]
        batch = build_step_batch(decodes, prefills, self.block_size)
        packed = batch.pack()
        if self.on_step is not None:
            self.on_step(packed)
        logits = self.forward(batch, packed)
        samplers = [s for s in decodes + prefills if s.samples]
        if not samplers:
            return {}, {}
        # Host work while the device runs the forward just launched: the grammar masks.
        grammar_mask = self.structured.fill([s.request.request_id for s in samplers]) \
            if self.structured is not None else None
        sampling = SamplingBatch(
            params=[s.request.sampling_params for s in samplers],
            generators=[s.request.generator for s in samplers],
            banned_token_ids=_banned(samplers, eos_token_ids))
        if self.sample_vocab_size is not None:
            logits = logits[:, :self.sample_vocab_size]
        logits = adjust_logits(logits, [s.request for s in samplers])  # penalties, logit_bias
        if grammar_mask is not None:  # last: no bias brings back a token the grammar forbids
            logits = grammar_mask.apply(logits)
        token_ids, logprobs = sample(logits, sampling)
        sampled = {s.request.request_id: t for s, t in zip(samplers, token_ids)}
        sampled_logprobs = {s.request.request_id: lp for s, lp in zip(samplers, logprobs) if lp is not None}
        return sampled, sampled_logprobs

    def forward(self, batch: StepBatch, packed: np.ndarray | None = None) -> torch.Tensor | None:
        """The model over one batch -> logits [S, vocab] (float32) of `batch.logits_rows`;
        `packed`: `batch.pack()` when the caller already has it."""
        if self.graphs is not None and self.graphs.can_run(batch):
            return self.graphs.run(batch)
        device_packed = self.to_device(batch.pack() if packed is None else packed)
        fields = batch.view_of(device_packed)  # the same fields, now views of the device buffer
        meta = self.attention_metadata(batch, fields)
        hidden = self.model(fields.input_ids, fields.positions, self.kv_caches, meta)
        if not len(batch.logits_rows):
            return None
        return self.model.compute_logits(hidden.index_select(0, fields.logits_rows))

    def to_device(self, array: np.ndarray) -> torch.Tensor:
        """`array` on the device through one reused pinned buffer (no allocation per step); the
        copy is asynchronous, and the buffer is refilled only after the last copy from it ended."""
        host = torch.from_numpy(array)
        if self.device.type != "cuda":
            return host
        n = host.numel()
        if self._staging is None or self._staging.numel() < n:
            self._staging = torch.empty(max(n, 2 * (0 if self._staging is None else self._staging.numel()), 1 << 16),
                                        dtype=host.dtype, pin_memory=True)
        else:
            self._staging_done.synchronize()
        self._staging[:n].copy_(host)
        out = self._staging[:n].to(self.device, non_blocking=True)
        self._staging_done.record()
        return out

    def attention_metadata(self, batch: StepBatch, fields: StepBatch, num_splits: int | None = None
                           ) -> AttentionMetadata:
        """Attention metadata over `fields` (device tensors laid out as `batch`, the host copy)."""
        nd = batch.num_decodes
        if self.backend == "triton":
            if num_splits is None:
                from tidal.kernels.triton_attention import choose_num_splits
                num_splits = choose_num_splits(nd, self.num_kv_heads,
                                               int(batch.decode_context_lens.max()) if nd else 0, self.num_sms)
            return AttentionMetadata(
                slot_mapping=fields.slot_mapping, num_decode_tokens=nd, backend="triton", num_splits=num_splits,
                decode_block_tables=fields.decode_block_tables, decode_context_lens=fields.decode_context_lens,
                prefill_cu_query_lens=fields.prefill_cu_query_lens, prefill_context_lens=fields.prefill_context_lens,
                prefill_block_tables=fields.prefill_block_tables,
                prefill_max_query_len=batch.prefill_max_query_len)
        cu, ctx = batch.prefill_cu_query_lens, batch.prefill_context_lens
        spans = [PrefillSpan(nd + int(cu[i]), nd + int(cu[i + 1]), int(ctx[i]),
                             fields.prefill_block_tables[i, :-(-int(ctx[i]) // self.block_size)])
                 for i in range(batch.num_prefills)]
        return AttentionMetadata(
            slot_mapping=fields.slot_mapping.long(), num_decode_tokens=nd,
            decode_block_tables=fields.decode_block_tables if nd else None,
            decode_context_lens=fields.decode_context_lens if nd else None,
            decode_max_context_len=int(batch.decode_context_lens.max()) if nd else 0,
            prefills=spans)


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
