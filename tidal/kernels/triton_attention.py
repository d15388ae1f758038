"""Triton kernels for paged attention on the GPU: KV cache writes, decode and prefill attention.

This file owns the three kernels the model calls on CUDA, their launch configurations, and
plain-torch loop references that define what each kernel must compute (the tests' oracles).
The cache layout is `paged_attention.py`'s: one layer's `k_cache`, `v_cache` are
[num_kv_heads, num_blocks, block_size, head_dim] with the last dim contiguous, and a token's
slot is `block_id * block_size + offset`.

Query head h reads kv head h // G (G = num_heads // num_kv_heads), as in `reference_attention`.

Per-layer options (gpt-oss), each a constexpr switch so a launch without them compiles to the
same code as before: a sliding `window` (query at position p sees keys p - window + 1 .. p;
decode starts its key range at the window, prefill masks the tile's keys against it) and
`sinks` [H] float32, a logit per query head added to the softmax's denominator once, after the
key loop (decode with splits: in the merge kernel).

All three launches read no device values on the host and allocate only from shapes, so they
can be captured in a CUDA graph. Softmax runs in the log2 domain: the scores are multiplied by
`scale * log2(e)` so that `exp2` (one MUFU instruction) replaces `exp`.

Without triton the module still imports (`HAS_TRITON` is False); the kernels then raise.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

LOG2E = 1.4426950408889634


# --- Launch configurations ----------------------------------------------------------------------
# The usual FlashAttention-2 / flash-decoding values for Hopper, not autotuned (the kernels were
# written on a machine without a GPU; `benchmarks/attention_gpu.py` measures them). What ptxas
# reports for sm_90 in bf16 (tests/test_triton_kernels.py compiles them, failing on spills):
#   prefill D=128, 128x64 tiles, 8 warps, 3 stages: 185 registers, ~96 KiB shared, wgmma, cp.async
#   prefill D=64, 128x64 tiles, 4 warps, 3 stages: 255 registers, ~48 KiB shared
#   decode D=128, 64-key tiles, 4 warps, 2 stages: ~92 registers, ~38 KiB shared (several per SM)

def prefill_config(head_dim: int, dtype: torch.dtype) -> dict:
    """BLOCK_M query rows x BLOCK_N keys per step, for the padded head dim."""
    if dtype == torch.float32:
        # fp32 (a test path) multiplies on FMA units ("ieee"): small tiles, or registers spill.
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2)
    if head_dim <= 64:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)
    if head_dim <= 128:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
    # D=256: a 128-row fp32 accumulator would not fit in registers; halve both tiles.
    return dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2)


def decode_config(head_dim: int) -> dict:
    """Decode is bandwidth-bound: a 64-key tile is 16 KiB of K (+16 of V) at D=128 in bf16; two
    stages keep the next tile's loads in flight during this one's math, and a small program lets
    several share an SM (more bytes in flight per SM)."""
    if head_dim <= 128:
        return dict(BLOCK_N=64, num_warps=4, num_stages=2)
    return dict(BLOCK_N=32, num_warps=4, num_stages=2)


def choose_num_splits(batch: int, kv_heads: int, max_context_len_hint: int, num_sms: int,
                      max_splits: int = 16, min_keys_per_split: int = 256) -> int:
    """Splits of the key axis for `decode_attention`: enough programs (batch x kv_heads x splits)
    for ~2 waves over the SMs, but no split shorter than `min_keys_per_split` keys (a short
    split costs a scratch round trip for little bandwidth). 1 once the batch fills the GPU."""
    programs = batch * kv_heads
    wanted = -(-2 * num_sms // max(programs, 1))
    by_length = max(1, max_context_len_hint // min_keys_per_split)
    return max(1, min(wanted, by_length, max_splits))


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _require_triton() -> None:
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed: the Triton attention kernels are unavailable")


def _check_options(window: int | None, sinks: torch.Tensor | None, num_heads: int) -> None:
    assert window is None or window > 0, "a window holds at least the query itself"
    assert sinks is None or (sinks.dtype == torch.float32 and sinks.shape == (num_heads,)
                             and sinks.is_contiguous()), "sinks: [num_heads] float32, contiguous"


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    # K and V share one stride set in the kernels.
    assert k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride(), "k/v caches differ in layout"
    assert k_cache.stride(-1) == 1, "the cache's head_dim must be contiguous"


# --- Kernels ---------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _write_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr,
                         stride_kt, stride_kh, stride_vt, stride_vh,
                         stride_ch, stride_cb, stride_ct,
                         KV_HEADS: tl.constexpr, KVH_PAD: tl.constexpr,
                         HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr):
        # One program per token: all kv heads of its K and V row, [KVH_PAD, D_PAD] tiles.
        t = tl.program_id(0).to(tl.int64)
        slot = tl.load(slot_ptr + t)
        keep = slot >= 0  # padding rows of a CUDA-graph batch carry slot -1
        slot = tl.maximum(slot, 0)
        h = tl.arange(0, KVH_PAD)
        d = tl.arange(0, D_PAD)
        mask = keep & (h < KV_HEADS)[:, None] & (d < HEAD_DIM)[None, :]
        dst = (h.to(tl.int64) * stride_ch)[:, None] + (slot // BLOCK_SIZE) * stride_cb \
            + (slot % BLOCK_SIZE) * stride_ct + d[None, :]
        k = tl.load(k_ptr + t * stride_kt + (h * stride_kh)[:, None] + d[None, :], mask=mask)
        tl.store(kc_ptr + dst, k.to(kc_ptr.dtype.element_ty), mask=mask)
        v = tl.load(v_ptr + t * stride_vt + (h * stride_vh)[:, None] + d[None, :], mask=mask)
        tl.store(vc_ptr + dst, v.to(vc_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr):
        # fp32 inputs would otherwise go through TF32 (10-bit mantissa) on NVIDIA.
        if IEEE:
            return tl.dot(a, b, input_precision="ieee")
        else:
            return tl.dot(a, b)

    @triton.jit
    def _kv_offsets(bt_row_ptr, n, valid, d, stride_kb, stride_kt, BLOCK_SIZE: tl.constexpr,
                    MASKED: tl.constexpr):
        """Element offsets [BLOCK_N, D_PAD] of keys n of one request in one head's cache:
        key n lives in block bt[n // BLOCK_SIZE] at row n % BLOCK_SIZE (int64: the block term
        exceeds 2^31 elements on a large cache)."""
        if MASKED:
            blk = tl.load(bt_row_ptr + n // BLOCK_SIZE, mask=valid, other=0)
        else:
            blk = tl.load(bt_row_ptr + n // BLOCK_SIZE)
        row = blk.to(tl.int64) * stride_kb + (n % BLOCK_SIZE) * stride_kt
        return row[:, None] + d[None, :]

    @triton.jit
    def _load_tile(ptrs, valid, d_ok, MASK_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
        """[BLOCK_N, D_PAD] rows; masks only what may be out of range, so that full tiles load
        as unpredicated 16-byte vectors."""
        if MASK_ROWS:
            if EVEN_D:
                return tl.load(ptrs, mask=valid[:, None], other=0.0)
            else:
                return tl.load(ptrs, mask=valid[:, None] & d_ok[None, :], other=0.0)
        else:
            if EVEN_D:
                return tl.load(ptrs)
            else:
                return tl.load(ptrs, mask=d_ok[None, :], other=0.0)

    @triton.jit
    def _attend(q, acc, m_i, l_i, k_base, v_base, bt_row_ptr, n0, kv_end, q_pos, d, d_ok,
                qk_scale, stride_kb, stride_kt, window,
                BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, IEEE: tl.constexpr, WINDOWED: tl.constexpr):
        """One online-softmax step over keys n0 .. n0 + BLOCK_N (fp32 state; log2 domain).
        MASKED: keys >= kv_end are dropped; CAUSAL (with MASKED): row r only sees keys <= q_pos[r];
        WINDOWED (with CAUSAL): and keys > q_pos[r] - window."""
        n = n0 + tl.arange(0, BLOCK_N)
        valid = n < kv_end
        offs = _kv_offsets(bt_row_ptr, n, valid, d, stride_kb, stride_kt, BLOCK_SIZE, MASKED)
        k = _load_tile(k_base + offs, valid, d_ok, MASKED, EVEN_D)
        s = _dot(q, tl.trans(k), IEEE) * qk_scale  # [rows, BLOCK_N]
        if MASKED:
            if CAUSAL:
                seen = valid[None, :] & (n[None, :] <= q_pos[:, None])
                if WINDOWED:
                    seen = seen & (n[None, :] > q_pos[:, None] - window)
                s = tl.where(seen, s, float("-inf"))
            else:
                s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_base + offs, valid, d_ok, MASKED, EVEN_D)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        return acc, m_new, l_i

    @triton.jit
    def _add_sink(acc, m_i, l_i, sink):
        """Fold a sink logit (natural log domain) into the softmax state: one more term of the
        denominator, nothing added to acc. Rescales to max(m_i, sink) so exp2 cannot overflow."""
        sink = sink * 1.4426950408889634  # log2(e): the state is in the log2 domain
        m_new = tl.maximum(m_i, sink)
        alpha = tl.math.exp2(m_i - m_new)
        return acc * alpha[:, None], l_i * alpha + tl.math.exp2(sink - m_new)

    @triton.jit
    def _decode_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, ctx_ptr, out_ptr, part_o_ptr, part_lse_ptr, sinks_ptr,
                       qk_scale, num_splits, window,
                       stride_qb, stride_qh, stride_kh, stride_kb, stride_kt, stride_btb,
                       stride_ob, stride_oh,
                       G: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                       BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, DIRECT: tl.constexpr,
                       EVEN_D: tl.constexpr, IEEE: tl.constexpr, WINDOWED: tl.constexpr,
                       HAS_SINKS: tl.constexpr):
        # Program (b, kv head, split): the G query heads of one kv head as G_PAD (>= 16) rows of a
        # tl.dot, over this split's contiguous range of keys, read once. With a window the range
        # starts at ctx - window: every key from there on is in the (single) query's window.
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        ctx = tl.load(ctx_ptr + b)
        first = 0
        if WINDOWED:
            first = tl.maximum(ctx - window, 0)
        tiles_per_split = tl.cdiv(tl.cdiv(ctx - first, BLOCK_N), num_splits)
        start = first + split * tiles_per_split * BLOCK_N
        end = tl.minimum(start + tiles_per_split * BLOCK_N, ctx)  # ctx == 0: empty range, no reads
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, D_PAD)
        d_ok = d < HEAD_DIM
        heads = kvh * G + g
        io_mask = (g < G)[:, None] & d_ok[None, :]
        q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + (heads * stride_qh)[:, None] + d[None, :],
                    mask=io_mask, other=0.0)
        q = q.to(k_ptr.dtype.element_ty)
        k_base = k_ptr + kvh.to(tl.int64) * stride_kh
        v_base = v_ptr + kvh.to(tl.int64) * stride_kh
        bt_row = bt_ptr + b.to(tl.int64) * stride_btb
        acc = tl.zeros([G_PAD, D_PAD], dtype=tl.float32)
        # A finite floor instead of -inf keeps exp2(m_i - m_new) finite; it is only a stabilizer.
        m_i = tl.full([G_PAD], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([G_PAD], dtype=tl.float32)
        for n0 in range(start, end, BLOCK_N):
            acc, m_i, l_i = _attend(q, acc, m_i, l_i, k_base, v_base, bt_row, n0, end, g, d, d_ok, qk_scale,
                                    stride_kb, stride_kt, window, BLOCK_SIZE, BLOCK_N, True, False, EVEN_D, IEEE,
                                    False)
        has_keys = l_i > 0
        if HAS_SINKS and DIRECT:  # split: the merge adds the sink once
            acc, l_i = _add_sink(acc, m_i, l_i, tl.load(sinks_ptr + heads, mask=g < G, other=0.0))
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # empty: acc is 0, so o is 0
        if DIRECT:
            tl.store(out_ptr + b.to(tl.int64) * stride_ob + (heads * stride_oh)[:, None] + d[None, :],
                     o.to(out_ptr.dtype.element_ty), mask=io_mask)
        else:
            # Scratch [B, H, num_splits, D_PAD] and lse [B, H, num_splits], fp32, contiguous.
            num_heads = tl.num_programs(1) * G
            row = (b * num_heads + heads).to(tl.int64) * num_splits + split
            lse = tl.where(has_keys, m_i + tl.math.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
            tl.store(part_lse_ptr + row, lse, mask=g < G)
            tl.store(part_o_ptr + (row * D_PAD)[:, None] + d[None, :], o, mask=(g < G)[:, None])

    @triton.jit
    def _decode_reduce_kernel(part_o_ptr, part_lse_ptr, out_ptr, sinks_ptr, num_splits, stride_ob, stride_oh,
                              HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, S_PAD: tl.constexpr,
                              HAS_SINKS: tl.constexpr):
        # Program (b, h): merge the splits' normalized outputs, weighted by exp2(lse - max lse).
        b = tl.program_id(0)
        h = tl.program_id(1)
        row = (b * tl.num_programs(1) + h).to(tl.int64) * num_splits
        s = tl.arange(0, S_PAD)
        d = tl.arange(0, D_PAD)
        lse = tl.load(part_lse_ptr + row + s, mask=s < num_splits, other=float("-inf"))
        top = tl.max(lse, 0)
        top = tl.where(top == float("-inf"), 0.0, top)  # ctx == 0: every split empty
        if HAS_SINKS:
            sink = tl.load(sinks_ptr + h) * 1.4426950408889634  # log2 domain, like lse
            top = tl.maximum(top, sink)
        w = tl.math.exp2(lse - top)
        denom = tl.sum(w, 0)
        if HAS_SINKS:
            denom += tl.math.exp2(sink - top)
        denom = tl.where(denom > 0, denom, 1.0)
        o = tl.load(part_o_ptr + ((row + s) * D_PAD)[:, None] + d[None, :], mask=(s < num_splits)[:, None],
                    other=0.0)
        o = tl.sum(w[:, None] * o, 0) / denom
        tl.store(out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + d, o.to(out_ptr.dtype.element_ty),
                 mask=d < HEAD_DIM)

    @triton.jit
    def _prefill_kernel(q_ptr, k_ptr, v_ptr, cu_ptr, ctx_ptr, bt_ptr, out_ptr, sinks_ptr, qk_scale, window,
                        stride_qt, stride_qh, stride_kh, stride_kb, stride_kt, stride_btp,
                        stride_ot, stride_oh,
                        G: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                        BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        EVEN_D: tl.constexpr, IEEE: tl.constexpr, WINDOWED: tl.constexpr,
                        HAS_SINKS: tl.constexpr):
        # Program (query tile, head, request). Tiles run last-first: under the causal mask the
        # last tiles have the most keys, and starting them first shortens the tail of the grid.
        tile = tl.num_programs(0) - 1 - tl.program_id(0)
        h = tl.program_id(1)
        p = tl.program_id(2)
        q_start = tl.load(cu_ptr + p)
        q_len = tl.load(cu_ptr + p + 1) - q_start
        ctx = tl.load(ctx_ptr + p)
        i = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        q_pos = ctx - q_len + i  # the chunk sits at the end of the context
        d = tl.arange(0, D_PAD)
        d_ok = d < HEAD_DIM
        io_mask = (i < q_len)[:, None] & d_ok[None, :]
        rows = (q_start + i).to(tl.int64)
        q = tl.load(q_ptr + (rows * stride_qt)[:, None] + h * stride_qh + d[None, :], mask=io_mask, other=0.0)
        q = q.to(k_ptr.dtype.element_ty)
        # Keys [0, tile_first) precede every row of the tile (no mask); keys up to kv_end need the causal one.
        tile_first = ctx - q_len + tile * BLOCK_M
        kv_end = tl.minimum(ctx, tile_first + BLOCK_M)
        kv_end = tl.where(tile * BLOCK_M < q_len, kv_end, 0)  # tiles past this chunk's end: nothing
        full_end = tl.minimum((tile_first // BLOCK_N) * BLOCK_N, kv_end)
        k_base = k_ptr + (h // G).to(tl.int64) * stride_kh
        v_base = v_ptr + (h // G).to(tl.int64) * stride_kh
        bt_row = bt_ptr + p.to(tl.int64) * stride_btp
        acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        if WINDOWED:
            # Keys from the first row's window start (tile-aligned down) to kv_end, every tile
            # masked: at most window + BLOCK_M keys, so no unmasked stretch is worth a loop.
            window_start = tl.maximum(tile_first - window + 1, 0)
            for n0 in range((window_start // BLOCK_N) * BLOCK_N, kv_end, BLOCK_N):
                acc, m_i, l_i = _attend(q, acc, m_i, l_i, k_base, v_base, bt_row, n0, kv_end, q_pos, d, d_ok,
                                        qk_scale, stride_kb, stride_kt, window, BLOCK_SIZE, BLOCK_N, True, True,
                                        EVEN_D, IEEE, True)
        else:
            for n0 in range(0, full_end, BLOCK_N):
                acc, m_i, l_i = _attend(q, acc, m_i, l_i, k_base, v_base, bt_row, n0, kv_end, q_pos, d, d_ok,
                                        qk_scale, stride_kb, stride_kt, window, BLOCK_SIZE, BLOCK_N, False, False,
                                        EVEN_D, IEEE, False)
            for n0 in range(full_end, kv_end, BLOCK_N):
                acc, m_i, l_i = _attend(q, acc, m_i, l_i, k_base, v_base, bt_row, n0, kv_end, q_pos, d, d_ok,
                                        qk_scale, stride_kb, stride_kt, window, BLOCK_SIZE, BLOCK_N, True, True,
                                        EVEN_D, IEEE, False)
        if HAS_SINKS:
            acc, l_i = _add_sink(acc, m_i, l_i, tl.load(sinks_ptr + h))
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + (rows * stride_ot)[:, None] + h * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=io_mask)


# --- Launchers ----------------------------------------------------------------------------------------

def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store this step's keys and values k, v [T, kv_heads, D] at their slots ([T] int64);
    a negative slot skips the token. k, v may be strided views with a contiguous last dim."""
    _require_triton()
    _check_cache(k_cache, v_cache)
    num_tokens, kv_heads, head_dim = k.shape
    assert k.stride(-1) == 1 and v.stride(-1) == 1, "k, v need a contiguous head_dim"
    if num_tokens == 0:
        return
    _write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        KV_HEADS=kv_heads, KVH_PAD=_pow2(kv_heads), HEAD_DIM=head_dim, D_PAD=_pow2(head_dim),
        BLOCK_SIZE=k_cache.shape[2], num_warps=4)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, scale: float, num_splits: int,
                     out: torch.Tensor | None = None, window: int | None = None,
                     sinks: torch.Tensor | None = None) -> torch.Tensor:
    """One query token per request: q [B, H, D] over keys 0 .. context_lens[b] - 1 of the cache
    (with a window, only the last `window` of them), through block_tables [B, max_blocks] int32.
    A row with context 0 (padding) gets zeros. sinks: [H] float32 logits or None.
    num_splits > 1 splits each request's keys into that many ranges (flash-decoding) and merges
    them in a second kernel through fp32 scratch sized from shapes."""
    _require_triton()
    _check_cache(k_cache, v_cache)
    batch, num_heads, head_dim = q.shape
    kv_heads, _, block_size, _ = k_cache.shape
    assert q.stride(-1) == 1 and num_heads % kv_heads == 0 and num_splits >= 1
    _check_options(window, sinks, num_heads)
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    groups = num_heads // kv_heads
    d_pad = _pow2(head_dim)
    cfg = decode_config(d_pad)
    direct = num_splits == 1
    if direct:
        part_o = part_lse = out  # unused by the kernel in this mode
    else:
        part_o = torch.empty((batch, num_heads, num_splits, d_pad), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((batch, num_heads, num_splits), dtype=torch.float32, device=q.device)
    _decode_kernel[(batch, kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, part_o, part_lse, q if sinks is None else sinks,
        scale * LOG2E, num_splits, window or 0,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1),
        G=groups, G_PAD=max(16, _pow2(groups)), HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK_SIZE=block_size,
        BLOCK_N=cfg["BLOCK_N"], DIRECT=direct, EVEN_D=head_dim == d_pad, IEEE=k_cache.dtype == torch.float32,
        WINDOWED=window is not None, HAS_SINKS=sinks is not None,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if not direct:
        _decode_reduce_kernel[(batch, num_heads)](
            part_o, part_lse, out, part_lse if sinks is None else sinks, num_splits, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, D_PAD=d_pad, S_PAD=_pow2(num_splits), HAS_SINKS=sinks is not None, num_warps=4)
    return out


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_query_lens: torch.Tensor,
                      context_lens: torch.Tensor, block_tables: torch.Tensor, max_query_len: int, scale: float,
                      out: torch.Tensor | None = None, window: int | None = None,
                      sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of P chunks q [T, H, D] (chunk p: rows cu_query_lens[p] .. cu_query_lens[p+1])
    over their requests' cached keys (this chunk's included: context_lens [P] counts them);
    query i of a chunk of length n sits at position context_len - n + i and, with a window, sees
    keys from position context_len - n + i - window + 1. sinks: [H] float32 logits or None."""
    _require_triton()
    _check_cache(k_cache, v_cache)
    num_tokens, num_heads, head_dim = q.shape
    kv_heads, _, block_size, _ = k_cache.shape
    assert q.stride(-1) == 1 and num_heads % kv_heads == 0
    _check_options(window, sinks, num_heads)
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    num_reqs = context_lens.shape[0]
    if num_tokens == 0 or num_reqs == 0 or max_query_len == 0:
        return out
    d_pad = _pow2(head_dim)
    cfg = prefill_config(d_pad, k_cache.dtype)
    grid = (triton.cdiv(max_query_len, cfg["BLOCK_M"]), num_heads, num_reqs)
    _prefill_kernel[grid](
        q, k_cache, v_cache, cu_query_lens, context_lens, block_tables, out, q if sinks is None else sinks,
        scale * LOG2E, window or 0,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1),
        G=num_heads // kv_heads, HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK_SIZE=block_size,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], EVEN_D=head_dim == d_pad, IEEE=k_cache.dtype == torch.float32,
        WINDOWED=window is not None, HAS_SINKS=sinks is not None,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


# --- Plain-torch references (test oracles: loops, fp32, host reads allowed) ---------------------------

def reference_write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       slot_mapping: torch.Tensor) -> None:
    """`write_kv` semantics: tokens with a negative slot are skipped."""
    block_size = k_cache.shape[2]
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot >= 0:
            k_cache[:, slot // block_size, slot % block_size] = k[t].to(k_cache.dtype)
            v_cache[:, slot // block_size, slot % block_size] = v[t].to(v_cache.dtype)


def _gather_keys(cache: torch.Tensor, table: torch.Tensor, length: int) -> torch.Tensor:
    """Keys 0 .. length - 1 of one request -> [kv_heads, length, D] in fp32."""
    block_size = cache.shape[2]
    pos = torch.arange(length, device=cache.device)
    return cache[:, table.long()[pos // block_size], pos % block_size].float()


def _attend_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      q_pos: torch.Tensor, window: int | None = None,
                      sinks: torch.Tensor | None = None) -> torch.Tensor:
    """q [n, H, D] at positions q_pos [n] over k, v [kvh, L, D]: row r sees keys <= q_pos[r] (and
    > q_pos[r] - window); sinks [H] as one more logit per head whose probability is dropped."""
    groups = q.shape[1] // k.shape[0]
    k, v = k.repeat_interleave(groups, 0), v.repeat_interleave(groups, 0)  # [H, L, D]
    scores = torch.einsum("nhd,hld->hnl", q.float(), k) * scale
    key_pos = torch.arange(k.shape[1], device=q.device)[None, :]
    hidden = key_pos > q_pos[:, None]
    if window is not None:
        hidden |= key_pos <= q_pos[:, None] - window
    scores = scores.masked_fill(hidden, float("-inf"))
    if sinks is None:
        probs = scores.softmax(-1)
    else:
        sink_column = sinks.float().view(-1, 1, 1).expand(-1, q.shape[0], 1)
        probs = torch.cat([scores, sink_column], dim=-1).softmax(-1)[..., :-1]
    return torch.einsum("hnl,hld->nhd", probs, v)


def reference_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, scale: float, window: int | None = None,
                     sinks: torch.Tensor | None = None) -> torch.Tensor:
    """`decode_attention` in fp32 -> [B, H, D] fp32; rows with context 0 are zeros."""
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    for b, ctx in enumerate(context_lens.tolist()):
        if ctx > 0:
            k, v = (_gather_keys(c, block_tables[b], ctx) for c in (k_cache, v_cache))
            q_pos = torch.tensor([ctx - 1], device=q.device)
            out[b] = _attend_reference(q[b:b + 1], k, v, scale, q_pos, window, sinks)[0]
    return out


def reference_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_query_lens: torch.Tensor,
                      context_lens: torch.Tensor, block_tables: torch.Tensor, scale: float,
                      window: int | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """`prefill_attention` in fp32 -> [T, H, D] fp32."""
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    cu = cu_query_lens.tolist()
    for p, ctx in enumerate(context_lens.tolist()):
        start, end = cu[p], cu[p + 1]
        if end > start:
            k, v = (_gather_keys(c, block_tables[p], ctx) for c in (k_cache, v_cache))
            q_pos = torch.arange(ctx - (end - start), ctx, device=q.device)
            out[start:end] = _attend_reference(q[start:end], k, v, scale, q_pos, window, sinks)
    return out


__all__ = ["HAS_TRITON", "choose_num_splits", "decode_attention", "decode_config", "prefill_attention",
           "prefill_config", "reference_decode", "reference_prefill", "reference_write_kv", "write_kv"]
