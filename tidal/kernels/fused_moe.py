"""Fused mixture-of-experts on CUDA: the experts of a sparse layer as two grouped Triton GEMMs.

`fused_experts` replaces `tidal.models.moe.grouped_experts` (its torch reference) on the GPU:
1. `align_pairs`: the T * k (token, expert) pairs sorted by expert, each expert's run padded to a
   multiple of the GEMM's BLOCK_M, so every block of rows belongs to one expert. Done with torch
   ops on the device and sized by an upper bound known on the host, never by a device value, so
   nothing reads back to the host and the whole layer can be captured in a CUDA graph. Blocks past
   the padded total (read from the device by the kernels) exit at once.
2. `_gate_up_kernel`: per block of rows of one expert, x[tokens] @ w13[e].T (gate and up rows as
   two accumulators), plus the biases, then the activation (SiLU-and-mul, or gpt-oss's clamped
   SwiGLU), written as [padded rows, I]: the [rows, 2I] gate_up never reaches memory.
3. `_down_kernel`: act @ w2[e].T plus the bias, times the pair's router weight, stored at the
   pair's own row of [T * k, H]; a sum over each token's k rows finishes (deterministic, no atomics).
Gate and up rows of an expert are found by a stride and an offset: Qwen3-MoE/Mixtral concatenate
them (gate j at row j, up j at I + j), gpt-oss interleaves them (2j, 2j + 1).
Arithmetic is float32 in the kernels, rounded once at each store. Block sizes come from a small
table by the mean number of rows per expert (`block_config`); autotuning per shape is future work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only installs: the torch path of tidal.models.moe
    HAS_TRITON = False

SILU, CLAMPED_SWIGLU = 0, 1


@dataclass(frozen=True)
class ExpertActivation:
    """What the gate_up kernel applies to the (gate, up) pair of each intermediate row."""
    kind: int  # SILU: silu(gate) * up; CLAMPED_SWIGLU: gpt-oss's
    interleaved: bool  # gate j at row 2j and up j at 2j + 1 (gpt-oss); else gate rows then up rows
    alpha: float = 1.0  # clamped SwiGLU only
    limit: float = 0.0  # clamped SwiGLU only


def usable(hidden: torch.Tensor) -> bool:
    return HAS_TRITON and hidden.is_cuda


@dataclass(frozen=True)
class BlockConfig:
    block_m: int
    block_n: int  # output columns per program of the down GEMM
    gate_up_block_n: int  # of the gate_up GEMM: two accumulators (gate and up) of this width
    block_k: int
    num_warps: int
    num_stages: int


def block_config(num_pairs: int, num_experts: int) -> BlockConfig:
    """A fixed table by the mean rows per expert: small tiles while decode reads weights (memory
    bound: more programs over the weight columns), large ones once prefill makes it compute bound."""
    rows_per_expert = num_pairs / num_experts
    if rows_per_expert <= 16:  # decode: any tiles within 2% of each other on an H100 (graph-replayed)
        return BlockConfig(16, 64, 64, 128, 4, 4)
    # prefill: wide tiles; at 8192 tokens 27% (gpt-oss-120b) and 13% (Qwen3-30B-A3B) faster than
    # (128, 128, 64, 64, 8, 3) on an H100, the best of a 24-config sweep
    return BlockConfig(64 if rows_per_expert <= 64 else 128, 256, 128, 64, 8, 4)


def align_pairs(expert_ids: torch.Tensor, num_experts: int,
                block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """expert_ids [T, k] -> (sorted_pairs [P] int32, block_expert [P / block_m] int32,
    padded_total [1] int32).

    sorted_pairs lists the pair indices t * k + j grouped by expert, each expert's run starting at a
    multiple of block_m; padding entries hold T * k (no pair). P = T * k + min(T * k, E) * (block_m - 1),
    rounded up to block_m, bounds the padded total whatever the routing. block_expert[b] is the expert
    of rows b * block_m ...; blocks at or past padded_total are unused."""
    num_pairs = expert_ids.numel()
    device = expert_ids.device
    flat = expert_ids.flatten()
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))  # not bincount: that reads the max on the host
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    padded_start = padded_end - padded
    count_start = counts.cumsum(0) - counts
    order = flat.argsort(stable=True)  # [T * k] pair indices grouped by expert
    sorted_experts = flat[order]
    rank = torch.arange(num_pairs, device=device) - count_start[sorted_experts]  # within its expert
    size = num_pairs + min(num_pairs, num_experts) * (block_m - 1)
    size = (size + block_m - 1) // block_m * block_m
    sorted_pairs = torch.full((size,), num_pairs, dtype=torch.int32, device=device)
    sorted_pairs.scatter_(0, padded_start[sorted_experts] + rank, order.to(torch.int32))
    block_starts = torch.arange(0, size, block_m, device=device)
    block_expert = torch.searchsorted(padded_end, block_starts, right=True).clamp_(max=num_experts - 1)
    return sorted_pairs, block_expert.to(torch.int32), padded_end[-1:].to(torch.int32)


if HAS_TRITON:
    @triton.jit
    def _gate_up_kernel(x_ptr, w_ptr, b_ptr, out_ptr, sorted_ptr, block_expert_ptr, padded_total_ptr,
                        num_pairs, hidden_size, inter_size, x_stride, w_stride_e, w_stride_n, b_stride_e,
                        out_stride, pair_stride, up_offset, alpha, limit,
                        TOP_K: tl.constexpr, ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        if pid_m * BLOCK_M >= tl.load(padded_total_ptr):
            return
        expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_ptr + rows)
        valid = pair < num_pairs
        token = (pair // TOP_K).to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < inter_size
        gate_rows = cols.to(tl.int64) * pair_stride
        ks = tl.arange(0, BLOCK_K)
        a_ptrs = x_ptr + token[:, None] * x_stride + ks[None, :]
        g_ptrs = w_ptr + expert * w_stride_e + gate_rows[None, :] * w_stride_n + ks[:, None]
        u_ptrs = g_ptrs + up_offset * w_stride_n
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(tl.cdiv(hidden_size, BLOCK_K)):
            k_ok = ks < hidden_size - k * BLOCK_K
            a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
            w_mask = k_ok[:, None] & col_ok[None, :]
            acc_g = tl.dot(a, tl.load(g_ptrs, mask=w_mask, other=0.0), acc_g)
            acc_u = tl.dot(a, tl.load(u_ptrs, mask=w_mask, other=0.0), acc_u)
            a_ptrs += BLOCK_K
            g_ptrs += BLOCK_K
            u_ptrs += BLOCK_K
        if HAS_BIAS:
            bias = b_ptr + expert * b_stride_e + gate_rows
            acc_g += tl.load(bias, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            acc_u += tl.load(bias + up_offset, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if ACTIVATION == 0:  # SILU
            act = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
        else:  # CLAMPED_SWIGLU
            gate = tl.minimum(acc_g, limit)
            up = tl.minimum(tl.maximum(acc_u, -limit), limit)
            act = (up + 1.0) * (gate / (1.0 + tl.exp(-alpha * gate)))
        out = out_ptr + rows.to(tl.int64)[:, None] * out_stride + cols[None, :]
        tl.store(out, act.to(out_ptr.dtype.element_ty), mask=valid[:, None] & col_ok[None, :])

    @triton.jit
    def _down_kernel(act_ptr, w_ptr, b_ptr, weights_ptr, out_ptr, sorted_ptr, block_expert_ptr,
                     padded_total_ptr, num_pairs, inter_size, hidden_size, act_stride, w_stride_e, w_stride_n,
                     b_stride_e, out_stride, HAS_BIAS: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        if pid_m * BLOCK_M >= tl.load(padded_total_ptr):
            return
        expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_ptr + rows)
        valid = pair < num_pairs
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < hidden_size
        ks = tl.arange(0, BLOCK_K)
        a_ptrs = act_ptr + rows.to(tl.int64)[:, None] * act_stride + ks[None, :]
        w_ptrs = w_ptr + expert * w_stride_e + cols.to(tl.int64)[None, :] * w_stride_n + ks[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(tl.cdiv(inter_size, BLOCK_K)):
            k_ok = ks < inter_size - k * BLOCK_K
            a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
            acc = tl.dot(a, tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0), acc)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        if HAS_BIAS:
            acc += tl.load(b_ptr + expert * b_stride_e + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        acc *= tl.load(weights_ptr + pair, mask=valid, other=0.0)[:, None]
        out = out_ptr + pair.to(tl.int64)[:, None] * out_stride + cols[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & col_ok[None, :])


def fused_experts(hidden: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor, w13: torch.Tensor,
                  w2: torch.Tensor, activation: ExpertActivation, w13_bias: torch.Tensor | None = None,
                  w2_bias: torch.Tensor | None = None, config: BlockConfig | None = None) -> torch.Tensor:
    """hidden [T, H], weights [T, k] float32, expert_ids [T, k], w13 [E, 2I, H], w2 [E, H, I] (biases
    [E, 2I], [E, H] or None) -> [T, H], as `tidal.models.moe.grouped_experts`."""
    num_tokens, top_k = expert_ids.shape
    num_experts, hidden_size, inter = w2.shape
    num_pairs = num_tokens * top_k
    if num_tokens == 0:
        return torch.zeros_like(hidden)
    assert hidden.stride(1) == 1 and w13.stride(2) == 1 and w2.stride(2) == 1, "rows must be contiguous"
    cfg = config or block_config(num_pairs, num_experts)
    sorted_pairs, block_expert, padded_total = align_pairs(expert_ids, num_experts, cfg.block_m)
    num_blocks = block_expert.numel()
    act = torch.empty(sorted_pairs.numel(), inter, dtype=hidden.dtype, device=hidden.device)
    pair_stride, up_offset = (2, 1) if activation.interleaved else (1, inter)
    b13 = w13_bias if w13_bias is not None else w13  # a dummy pointer when there is no bias
    launch = {"BLOCK_M": cfg.block_m, "BLOCK_K": cfg.block_k, "num_warps": cfg.num_warps,
              "num_stages": cfg.num_stages}
    _gate_up_kernel[(num_blocks, triton.cdiv(inter, cfg.gate_up_block_n))](
        hidden, w13, b13, act, sorted_pairs, block_expert, padded_total,
        num_pairs, hidden_size, inter, hidden.stride(0), w13.stride(0), w13.stride(1),
        b13.stride(0), act.stride(0), pair_stride, up_offset, activation.alpha, activation.limit,
        TOP_K=top_k, ACTIVATION=activation.kind, HAS_BIAS=w13_bias is not None, BLOCK_N=cfg.gate_up_block_n,
        **launch)
    out = torch.empty(num_pairs, hidden_size, dtype=hidden.dtype, device=hidden.device)
    b2 = w2_bias if w2_bias is not None else w2
    _down_kernel[(num_blocks, triton.cdiv(hidden_size, cfg.block_n))](
        act, w2, b2, weights.float().contiguous(), out, sorted_pairs, block_expert, padded_total,
        num_pairs, inter, hidden_size, act.stride(0), w2.stride(0), w2.stride(1), b2.stride(0), out.stride(0),
        HAS_BIAS=w2_bias is not None, BLOCK_N=cfg.block_n, **launch)
    return out.view(num_tokens, top_k, hidden_size).sum(dim=1)
