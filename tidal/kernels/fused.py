"""Fused elementwise kernels for the decoder layer on CUDA, each one launch instead of several.

A decode step of a small batch is a few hundred tiny kernels besides the matrix products; on the
GPU each costs a few microseconds even inside a CUDA graph, so the ones around every matmul are
fused here:
- `add_rms_norm`: residual += x, then RMSNorm of the sum (two reads and two writes of [T, N]);
- `rope_store_kv`: optional per-head q/k RMSNorm (Qwen3), rotate-half RoPE of q and k in place in
  the fused qkv rows, and the store of k and v into the paged cache at their slots;
- `silu_and_mul`: silu(gate) * up.
Their references are the plain-torch functions of `tidal.models.layers` and
`tidal.kernels.paged_attention.write_kv`; arithmetic is in float32, rounded once at the store.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only installs: the model uses the torch functions
    HAS_TRITON = False


def usable(x: torch.Tensor) -> bool:
    return HAS_TRITON and x.is_cuda


if HAS_TRITON:
    @triton.jit
    def _add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, n, x_stride, res_stride, out_stride, eps,
                             HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n
        x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            x += tl.load(res_ptr + row * res_stride + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(res_ptr + row * res_stride + cols, x.to(res_ptr.dtype.element_ty), mask=mask)
            x = x.to(res_ptr.dtype.element_ty).to(tl.float32)  # normalize the stored (rounded) sum
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * out_stride + cols, (x * rstd * w).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_store_kv_kernel(qkv_ptr, qkv_stride, cos_sin_ptr, pos_ptr, norm_ptr, slot_ptr,
                              k_cache_ptr, v_cache_ptr, head_stride, eps,
                              NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                              BLOCK_H: tl.constexpr, HAS_NORM: tl.constexpr):
        # One token: rows [q heads | k heads | v heads] of HEAD_DIM each, contiguous in qkv.
        t = tl.program_id(0).to(tl.int64)
        half: tl.constexpr = HEAD_DIM // 2
        heads = tl.arange(0, BLOCK_H)[:, None]
        cols = tl.arange(0, half)[None, :]
        qk_mask = heads < NUM_HEADS + NUM_KV_HEADS
        base = qkv_ptr + t * qkv_stride + heads * HEAD_DIM + cols
        x1 = tl.load(base, mask=qk_mask, other=0.0).to(tl.float32)
        x2 = tl.load(base + half, mask=qk_mask, other=0.0).to(tl.float32)
        if HAS_NORM:  # per-head RMSNorm before RoPE (q_norm for q heads, k_norm for k heads)
            rstd = 1.0 / tl.sqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / HEAD_DIM + eps)
            w1 = tl.load(norm_ptr + heads * HEAD_DIM + cols, mask=qk_mask, other=0.0).to(tl.float32)
            w2 = tl.load(norm_ptr + heads * HEAD_DIM + half + cols, mask=qk_mask, other=0.0).to(tl.float32)
            # round like the reference, which stores the normed heads before rotating them
            x1 = (x1 * rstd[:, None] * w1).to(qkv_ptr.dtype.element_ty).to(tl.float32)
            x2 = (x2 * rstd[:, None] * w2).to(qkv_ptr.dtype.element_ty).to(tl.float32)
        pos = tl.load(pos_ptr + t).to(tl.int64)
        cos = tl.load(cos_sin_ptr + pos * 2 * HEAD_DIM + cols).to(tl.float32)
        sin = tl.load(cos_sin_ptr + pos * 2 * HEAD_DIM + HEAD_DIM + half + cols).to(tl.float32)
        y1 = (x1 * cos - x2 * sin).to(qkv_ptr.dtype.element_ty)
        y2 = (x2 * cos + x1 * sin).to(qkv_ptr.dtype.element_ty)
        q_mask = heads < NUM_HEADS
        tl.store(base, y1, mask=q_mask)
        tl.store(base + half, y2, mask=q_mask)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        if slot >= 0:
            kv_heads = heads - NUM_HEADS
            k_mask = (heads >= NUM_HEADS) & qk_mask
            k_dst = k_cache_ptr + kv_heads * head_stride + slot * HEAD_DIM + cols
            tl.store(k_dst, y1.to(k_cache_ptr.dtype.element_ty), mask=k_mask)
            tl.store(k_dst + half, y2.to(k_cache_ptr.dtype.element_ty), mask=k_mask)
            v_heads = tl.arange(0, BLOCK_H)[:, None]
            v_mask = v_heads < NUM_KV_HEADS
            v_cols = tl.arange(0, HEAD_DIM)[None, :]
            v_src = qkv_ptr + t * qkv_stride + (NUM_HEADS + NUM_KV_HEADS + v_heads) * HEAD_DIM + v_cols
            v = tl.load(v_src, mask=v_mask, other=0.0)
            tl.store(v_cache_ptr + v_heads * head_stride + slot * HEAD_DIM + v_cols,
                     v.to(v_cache_ptr.dtype.element_ty), mask=v_mask)

    @triton.jit
    def _silu_and_mul_kernel(x_ptr, out_ptr, n, x_stride, out_stride, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n
        gate = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + row * x_stride + n + cols, mask=mask, other=0.0).to(tl.float32)
        # rounded like the reference: silu(gate) is a tensor of the input dtype before the multiply
        act = (gate / (1.0 + tl.exp(-gate))).to(x_ptr.dtype.element_ty).to(tl.float32)
        tl.store(out_ptr + row * out_stride + cols, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual: [T, N] -> (rms_norm(x + residual) * weight, x + residual), the sum stored in
    `residual` in place. With residual None: (rms_norm(x) * weight, x)."""
    num_tokens, n = x.shape
    out = torch.empty_like(x)
    if num_tokens:
        res = residual if residual is not None else x
        _add_rms_norm_kernel[(num_tokens,)](x, res, weight, out, n, x.stride(0), res.stride(0), out.stride(0), eps,
                                            HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(n),
                                            num_warps=8 if n >= 4096 else 4)
    return out, residual if residual is not None else x


def rope_store_kv(qkv: torch.Tensor, cos_sin_cache: torch.Tensor, positions: torch.Tensor,
                  qk_norm: torch.Tensor | None, eps: float, num_heads: int, num_kv_heads: int,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """qkv: [T, (H + 2 kvH) * D], rows contiguous. Rotates (after the optional per-head norm
    `qk_norm` [H + kvH, D]) q in place and k into the cache; stores v. cos_sin_cache: [P, 2, D];
    caches: [kvH, blocks, block_size, D]; slot -1 stores nothing for that token."""
    num_tokens = qkv.shape[0]
    head_dim = k_cache.shape[-1]
    assert qkv.stride(1) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    if not num_tokens:
        return
    block_h = triton.next_power_of_2(num_heads + num_kv_heads)
    _rope_store_kv_kernel[(num_tokens,)](
        qkv, qkv.stride(0), cos_sin_cache, positions, qk_norm if qk_norm is not None else qkv, slot_mapping,
        k_cache, v_cache, k_cache.stride(0), eps, NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim, BLOCK_H=block_h, HAS_NORM=qk_norm is not None, num_warps=4)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2 * I] (gate then up) -> silu(gate) * up: [T, I]."""
    num_tokens, width = gate_up.shape
    n = width // 2
    out = torch.empty((num_tokens, n), dtype=gate_up.dtype, device=gate_up.device)
    if num_tokens:
        block = 1024
        _silu_and_mul_kernel[(num_tokens, triton.cdiv(n, block))](gate_up, out, n, gate_up.stride(0), out.stride(0),
                                                                  BLOCK=block, num_warps=4)
    return out
