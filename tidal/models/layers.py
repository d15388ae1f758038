"""Small building blocks of the llama-family model: RMSNorm, rotary embeddings, SiLU-gated MLP.

Plain functions over tensors (no modules), so a layer's forward is a short run of torch calls
with no per-call module overhead. Every function works on the flat token axis [T, ...].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tidal.kernels import fused
from tidal.models.arch import ModelArch, rope_type_of


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim; x: [..., N], weight: [N] (or broadcastable to x)."""
    if weight.dim() == 1 and x.dim() == 2 and fused.usable(x):
        return fused.add_rms_norm(x, None, weight, eps)[0]
    if weight.dim() == 1:
        return F.rms_norm(x, weight.shape, weight, eps)
    # Per-head weights ([heads, D], q and k norms side by side): normalize, then scale.
    return F.rms_norm(x, x.shape[-1:], None, eps) * weight


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual): the residual add fused into the pre-norm."""
    if fused.usable(x):
        return fused.add_rms_norm(x, residual, weight, eps)
    residual = residual.add_(x)
    return F.rms_norm(residual, weight.shape, weight, eps), residual


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2 * I] (gate then up, side by side) -> silu(gate) * up: [T, I]."""
    if fused.usable(gate_up):
        return fused.silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)


def rope_inv_freq(arch: ModelArch) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] in float32, rope scaling applied."""
    dim = arch.head_dim
    inv_freq = 1.0 / (arch.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    rope_type = rope_type_of(arch.rope_scaling)
    if rope_type == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, arch.rope_scaling)
    elif rope_type == "freq_factors":
        inv_freq = inv_freq / torch.tensor(arch.rope_scaling["factors"], dtype=torch.float32)
    elif rope_type == "linear":
        inv_freq = inv_freq / arch.rope_scaling["factor"]
    return inv_freq


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1: long wavelengths divided by `factor`, short ones kept, a smooth blend between."""
    factor = scaling["factor"]
    low_freq_factor = scaling.get("low_freq_factor", 1.0)
    high_freq_factor = scaling.get("high_freq_factor", 4.0)
    old_context_len = scaling.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, blended, scaled)


def rope_cos_sin_cache(arch: ModelArch, max_positions: int, dtype: torch.dtype,
                       device: torch.device | str) -> torch.Tensor:
    """[max_positions, 2, head_dim]: cos and sign-folded sin for the rotate-half layout.

    Row p holds cos(p * f) for the two halves, and (-sin, +sin) so that
    rope(x) = x * cos + swap_halves(x) * sin_signed, where swap_halves([x1, x2]) = [x2, x1].
    Angles are computed in float32 like transformers, then cast to the model dtype.
    """
    inv_freq = rope_inv_freq(arch)
    positions = torch.arange(max_positions, dtype=torch.float32)
    freqs = positions[:, None] * inv_freq[None, :]  # [P, D/2]
    cos, sin = freqs.cos(), freqs.sin()
    cache = torch.stack([torch.cat([cos, cos], -1), torch.cat([-sin, sin], -1)], dim=1)  # [P, 2, D]
    return cache.to(device=device, dtype=dtype)


def apply_rope(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE. x: [T, heads, D]; cos_sin: [T, 2, D] (rows of the cache for `positions`)."""
    num_tokens, num_heads, head_dim = x.shape
    cos = cos_sin[:, 0:1, :]  # [T, 1, D], broadcast over heads
    sin = cos_sin[:, 1:2, :]
    swapped = x.view(num_tokens, num_heads, 2, head_dim // 2).flip(2).view(num_tokens, num_heads, head_dim)
    return torch.addcmul(x * cos, swapped, sin)
