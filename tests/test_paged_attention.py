"""Paged attention (every path: decode, whole prefill, chunk after a prefix) vs dense attention,
also with gpt-oss's sliding window and attention sinks."""

from __future__ import annotations

import pytest
import torch

from tidal.kernels.paged_attention import (AttentionMetadata, PrefillSpan, cache_shape, paged_attention,
                                           reference_attention, write_kv)

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 4, 64), (8, 2, 128), (16, 2, 64), (9, 3, 64)])
@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("window,with_sinks", [(None, False), (6, False), (None, True), (6, True), (21, True)],
                         ids=["full", "window6", "sinks", "window6-sinks", "window21-sinks"])
def test_mixed_step_matches_dense(device, dtype, heads, kv_heads, head_dim, block_size, window, with_sinks):
    torch.manual_seed(0)
    lengths = [1, 7, 33, 50]  # ragged; request 0..1 decode this step, 2 prefills whole, 3 is a chunk
    num_blocks = 64
    k_cache = torch.zeros(cache_shape(num_blocks, block_size, kv_heads, head_dim), dtype=dtype, device=device)
    v_cache = torch.zeros_like(k_cache)
    free = torch.randperm(num_blocks).tolist()
    seqs = []
    for n in lengths:
        table = torch.tensor([free.pop() for _ in range(-(-n // block_size))], device=device)
        q, k, v = (torch.randn(n, h, head_dim, dtype=dtype, device=device) for h in (heads, kv_heads, kv_heads))
        pos = torch.arange(n, device=device)
        seqs.append((table, q, k, v, table[pos // block_size] * block_size + pos % block_size))
    # Before the step: decoders hold all but their last token; the chunked one holds 20 tokens.
    cached = [lengths[0] - 1, lengths[1] - 1, 0, 20]
    for (table, q, k, v, slots), c in zip(seqs, cached):
        write_kv(k[:c], v[:c], k_cache, v_cache, slots[:c])
    decode, prefill = seqs[:2], seqs[2:]
    qs = torch.cat([q[-1:] for _, q, _, _, _ in decode] + [q[c:] for (_, q, _, _, _), c in zip(prefill, cached[2:])])
    ks = torch.cat([k[-1:] for _, _, k, _, _ in decode] + [k[c:] for (_, _, k, _, _), c in zip(prefill, cached[2:])])
    vs = torch.cat([v[-1:] for _, _, _, v, _ in decode] + [v[c:] for (_, _, _, v, _), c in zip(prefill, cached[2:])])
    slot_mapping = torch.cat([s[-1:] for *_, s in decode] + [s[c:] for (*_, s), c in zip(prefill, cached[2:])])
    max_blocks = max(len(t) for t, *_ in decode)
    tables = torch.zeros(len(decode), max_blocks, dtype=torch.long, device=device)
    for i, (t, *_) in enumerate(decode):
        tables[i, :len(t)] = t
    spans, start = [], len(decode)
    for (table, q, *_), c in zip(prefill, cached[2:]):
        spans.append(PrefillSpan(start, start + q.shape[0] - c, q.shape[0], table))
        start += q.shape[0] - c
    meta = AttentionMetadata(slot_mapping=slot_mapping, num_decode_tokens=len(decode),
                             decode_block_tables=tables,
                             decode_context_lens=torch.tensor(lengths[:2], device=device),
                             decode_max_context_len=max(lengths[:2]), prefills=spans)
    write_kv(ks, vs, k_cache, v_cache, slot_mapping)
    scale = head_dim ** -0.5
    sinks = 2 * torch.randn(heads, device=device) if with_sinks else None
    out = paged_attention(qs, k_cache, v_cache, meta, scale, window, sinks)
    expected = torch.cat([reference_attention(q, k, v, scale, window, sinks)[c if i >= 2 else -1:]
                          for i, ((_, q, k, v, _), c) in enumerate(zip(seqs, cached))])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), expected.float(), atol=tol, rtol=tol)
