"""Paged attention in plain torch: the CPU path and the reference for the Triton kernels.

The KV cache of one layer is two tensors `k_cache`, `v_cache` of shape
[num_kv_heads, num_blocks, block_size, head_dim] (`cache_shape`). A token's slot is
`block_id * block_size + offset`; `slot_mapping[t]` says where token t of the step is written.
Heads outermost means a gather of a request's blocks lands as [kv_heads, tokens, head_dim]:
the layout attention multiplies in, so no transposing copies follow the gather.

A step's flat token axis T holds, in order, the decode tokens (one query token per request,
`num_decode_tokens` of them) and then the prefill chunks (one or more query tokens each).

Two per-layer options (gpt-oss): a sliding `window` (a query at position p sees keys
p - window + 1 .. p; blocks wholly before every query's window are not gathered) and `sinks`, a
logit per query head that joins the softmax's denominator and adds nothing to the output:
out = sum_j exp(s_j) v_j / (exp(sink) + sum_j exp(s_j)). Without them the paths are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class PrefillSpan:
    """One request's chunk in a step: query tokens [query_start, query_end) of the flat axis."""

    query_start: int
    query_end: int
    context_len: int  # tokens in the cache after this step, this chunk included
    block_table: torch.Tensor  # [num_blocks_of_request] int64, on the device


@dataclass
class AttentionMetadata:
    """Where this step's K/V go and what each query attends to.

    `backend` picks the implementation (`tidal.kernels.attention`): `torch` reads `prefills` (one span
    per request) and `decode_max_context_len`; `triton` reads the batched `prefill_*` tensors and
    `num_splits`, and never a device value on the host, so its decode steps can be graph-captured.
    """

    slot_mapping: torch.Tensor  # [T] int64 (torch) or int32 (triton); negative: padding, not stored
    num_decode_tokens: int = 0
    decode_block_tables: torch.Tensor | None = None  # [Nd, max_blocks] int (padding: 0)
    decode_context_lens: torch.Tensor | None = None  # [Nd] int, this step's token included; 0: padding row
    decode_max_context_len: int = 0
    prefills: list[PrefillSpan] = field(default_factory=list)
    backend: str = "torch"
    num_splits: int = 1  # decode: key-range splits per (request, kv head)
    prefill_cu_query_lens: torch.Tensor | None = None  # [P + 1] int32, offsets after the decode tokens
    prefill_context_lens: torch.Tensor | None = None  # [P] int32, this chunk included
    prefill_block_tables: torch.Tensor | None = None  # [P, max_blocks] int32
    prefill_max_query_len: int = 0


def cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, int, int, int]:
    """Shape of one layer's K (or V) cache."""
    return (num_kv_heads, num_blocks, block_size, head_dim)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store this step's keys and values ([T, kv_heads, head_dim]) at their slots."""
    kv_heads, num_blocks, block_size, head_dim = k_cache.shape
    for new, cache in ((k, k_cache), (v, v_cache)):
        cache.view(kv_heads, num_blocks * block_size, head_dim).index_copy_(
            1, slot_mapping, new.transpose(0, 1).to(cache.dtype))


def _gather(cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """Blocks of `block_table` ([nb] or [B, nb]) -> [kvh, nb * bs, D] or [kvh, B, nb * bs, D]."""
    kv_heads, num_blocks, block_size, head_dim = cache.shape
    # One 2-D index_select over rows of whole blocks (memcpy per block; other index forms go
    # element by element on the CPU, 10x slower, measured). Row h * num_blocks + b is block b
    # of head h.
    heads = torch.arange(kv_heads, device=cache.device) * num_blocks
    rows = (heads[:, None] + block_table.reshape(1, -1)).reshape(-1)
    gathered = cache.view(kv_heads * num_blocks, block_size * head_dim).index_select(0, rows)
    return gathered.view(kv_heads, *block_table.shape[:-1], block_table.shape[-1] * block_size, head_dim)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float, window: int | None = None,
                    sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of this step's queries over the cache (already holding this step's K/V).

    q: [T, num_heads, head_dim] -> returns [T, num_heads, head_dim]; window, sinks [num_heads]: see
    the module docstring.
    """
    out = torch.empty_like(q)
    nd = meta.num_decode_tokens
    block_size = k_cache.shape[2]
    if nd:
        # Decode: one query per request, keys padded to the longest context and masked.
        # Keys padded to whole blocks (L = max_blocks * block_size); the mask hides the padding.
        tables, first = meta.decode_block_tables, 0
        if window is not None and tables.device.type == "cpu":  # a host read is free here
            first = max(0, int(meta.decode_context_lens.min()) - window) // block_size
        k = _gather(k_cache, tables[:, first:])  # [kvh, Nd, L, D]
        v = _gather(v_cache, tables[:, first:])
        out[:nd] = _decode_attention(q[:nd], k, v, meta.decode_context_lens, scale,
                                     first * block_size, window, sinks)
    for span in meta.prefills:
        qs, qe, ctx = span.query_start, span.query_end, span.context_len
        # Keys padded to whole blocks: positions >= ctx lie in every query's future, so masked.
        first = 0 if window is None else max(0, ctx - (qe - qs) - window + 1) // block_size
        k = _gather(k_cache, span.block_table[first:])  # [kvh, keys, D]
        v = _gather(v_cache, span.block_table[first:])
        out[qs:qe] = _prefill_attention(q[qs:qe], k, v, ctx, scale, first * block_size, window, sinks)
    return out


def _use_matmul_path(k: torch.Tensor, sinks: torch.Tensor | None) -> bool:
    """The CPU's fused SDPA kernel is slow in 16-bit (4x a matmul form, measured); elsewhere
    (CUDA, or float32 on the CPU) SDPA is the faster choice, unless sinks need the explicit scores."""
    return sinks is not None or (k.device.type == "cpu" and k.dtype != torch.float32)


def _softmax(scores: torch.Tensor, sink: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last dim of float32 `scores`; a `sink` logit (broadcast to [..., 1]) joins
    each row's denominator. Rows always hold a finite score (a query sees itself)."""
    if sink is None:
        return scores.softmax(dim=-1)
    top = torch.maximum(scores.amax(dim=-1, keepdim=True), sink)
    probs = scores.sub_(top).exp_()
    return probs.div_(probs.sum(dim=-1, keepdim=True).add_((sink - top).exp()))


def _prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: int, scale: float,
                       key_start: int = 0, window: int | None = None,
                       sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of a chunk's queries [q_len, H, D], which sit at the end of the context,
    over k, v [kvh, keys, D] holding positions key_start .. (>= ctx): query i sees keys up to
    ctx - q_len + i (and, with a window, from ctx - q_len + i - window + 1)."""
    q_len, num_heads, head_dim = q.shape
    num_kv_heads, num_keys = k.shape[0], k.shape[1]
    q_pos = torch.arange(ctx - q_len, ctx, device=q.device)
    key_pos = torch.arange(key_start, key_start + num_keys, device=q.device)
    hidden = key_pos[None, :] > q_pos[:, None]  # [q_len, keys]: the future
    if window is not None:
        hidden |= key_pos[None, :] <= q_pos[:, None] - window
    if not _use_matmul_path(k, sinks):
        n = ctx - key_start
        k, v, hidden = k[:, :n], v[:, :n], hidden[:, :n]
        qh = q.transpose(0, 1).to(k.dtype)  # [H, q_len, D]
        if q_len == ctx and window is None:
            o = F.scaled_dot_product_attention(qh, k, v, is_causal=True, scale=scale, enable_gqa=True)
        else:
            o = F.scaled_dot_product_attention(qh, k, v, attn_mask=~hidden, scale=scale, enable_gqa=True)
        return o.transpose(0, 1)
    groups = num_heads // num_kv_heads
    # Heads that share a kv head become one matrix: [kvh, G * q_len, D].
    qg = q.to(k.dtype).view(q_len, num_kv_heads, groups, head_dim).permute(1, 2, 0, 3)
    qg = qg.reshape(num_kv_heads, groups * q_len, head_dim)
    scores = torch.bmm(qg, k.transpose(1, 2)).float().mul_(scale)  # [kvh, G * q_len, keys]
    scores = scores.view(num_kv_heads, groups, q_len, num_keys).masked_fill_(hidden, float("-inf"))
    sink = None if sinks is None else sinks.float().view(num_kv_heads, groups, 1, 1)
    probs = _softmax(scores, sink).view(num_kv_heads, groups * q_len, num_keys)
    o = torch.bmm(probs.to(v.dtype), v)  # [kvh, G * q_len, D]
    return o.view(num_kv_heads, groups, q_len, head_dim).permute(2, 0, 1, 3).reshape(q_len, num_heads, head_dim)


def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context_lens: torch.Tensor,
                      scale: float, key_start: int = 0, window: int | None = None,
                      sinks: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, H, D] over k, v [kvh, B, L, D] (positions key_start ..) with keys >= context_lens[b]
    (and, with a window, keys < context_lens[b] - window) masked -> [B, H, D]."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads, _, length, _ = k.shape
    key_pos = torch.arange(key_start, key_start + length, device=q.device)
    hidden = key_pos[None, :] >= context_lens[:, None]  # [B, L]
    if window is not None:
        hidden |= key_pos[None, :] < (context_lens - window)[:, None]
    if not _use_matmul_path(k, sinks):
        o = F.scaled_dot_product_attention(q.unsqueeze(2).to(k.dtype), k.transpose(0, 1), v.transpose(0, 1),
                                           attn_mask=~hidden[:, None, None, :], scale=scale, enable_gqa=True)
        return o.squeeze(2)
    groups = num_heads // num_kv_heads
    qg = q.to(k.dtype).view(batch, num_kv_heads, groups, head_dim).transpose(0, 1)  # [kvh, B, G, D]
    scores = torch.matmul(qg, k.transpose(2, 3)).float().mul_(scale)  # [kvh, B, G, L]
    scores.masked_fill_(hidden[None, :, None, :], float("-inf"))
    sink = None if sinks is None else sinks.float().view(num_kv_heads, 1, groups, 1)
    o = torch.matmul(_softmax(scores, sink).to(v.dtype), v)  # [kvh, B, G, D]
    return o.transpose(0, 1).reshape(batch, num_heads, head_dim)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                        window: int | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Dense causal attention of a whole sequence, [L, H, D] x [L, kvh, D] (test oracle); the
    sinks as an extra key column whose probability is dropped."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1).float()
    v = v.repeat_interleave(groups, dim=1).float()
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    length = q.shape[0]
    allowed = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    if window is not None:
        allowed = allowed.triu(-(window - 1))
    scores = scores.masked_fill(~allowed, float("-inf"))
    if sinks is not None:
        sink_column = sinks.float().view(-1, 1, 1).expand(-1, length, 1)
        probs = torch.cat([scores, sink_column], dim=-1).softmax(-1)[..., :-1]
    else:
        probs = scores.softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)
