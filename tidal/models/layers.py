"""Small building blocks of the llama-family model: RMSNorm, rotary embeddings (with llama3 and YaRN
scaling), SiLU-gated MLP, gpt-oss's clamped SwiGLU.

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


def clamped_swiglu(gate_up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss's expert activation. [T, 2 * I] with gate and up interleaved (gate j in column 2j,
    up j in 2j + 1, as its checkpoints store them) -> [T, I]:
    (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g), g = min(gate, limit)."""
    gate, up = gate_up[..., ::2], gate_up[..., 1::2]
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


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
    elif rope_type == "yarn":
        inv_freq = _yarn_inv_freq(inv_freq, arch)
    return inv_freq


def rope_attention_scaling(arch: ModelArch) -> float:
    """The factor cos and sin are multiplied by (so q and k both, and the scores by its square):
    YaRN's mscale, 1 for every other rope type. As transformers computes it: `attention_factor`
    when given, else 0.1 * ln(factor) + 1 (DeepSeek's `mscale` / `mscale_all_dim` ratio when both set)."""
    scaling = arch.rope_scaling or {}
    if rope_type_of(scaling) != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = _yarn_factor(arch)

    def mscale(weight: float = 1.0) -> float:
        return 1.0 if factor <= 1 else 0.1 * weight * math.log(factor) + 1.0

    if scaling.get("mscale") and scaling.get("mscale_all_dim"):
        return mscale(scaling["mscale"]) / mscale(scaling["mscale_all_dim"])
    return mscale()


def _yarn_factor(arch: ModelArch) -> float:
    scaling = arch.rope_scaling
    if scaling.get("factor") is not None:
        return float(scaling["factor"])
    return arch.max_position_embeddings / scaling["original_max_position_embeddings"]


def _yarn_inv_freq(inv_freq: torch.Tensor, arch: ModelArch) -> torch.Tensor:
    """YaRN: frequencies that turn fewer than `beta_slow` times over the original context are
    divided by `factor` (interpolated), those turning more than `beta_fast` times are kept
    (extrapolated), with a linear ramp over the dims between. `truncate` (default on, off in
    gpt-oss) rounds the ramp's ends to whole dims."""
    scaling, dim, base = arch.rope_scaling, arch.head_dim, arch.rope_theta
    factor = _yarn_factor(arch)
    original = scaling["original_max_position_embeddings"]
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:  # the dim whose frequency turns `rotations` times
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: keep the frequency, 0: divide it by factor
    # Written as transformers writes it, so that the table matches it to the bit.
    interpolated = 1.0 / (factor * base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    return interpolated * (1 - keep) + inv_freq * keep


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
    Angles are computed in float32 like transformers, then cast to the model dtype. YaRN's
    attention scaling is folded into both (`rope_attention_scaling`), as transformers does.
    """
    inv_freq = rope_inv_freq(arch)
    positions = torch.arange(max_positions, dtype=torch.float32)
    freqs = positions[:, None] * inv_freq[None, :]  # [P, D/2]
    cos, sin = freqs.cos(), freqs.sin()
    attention_scaling = rope_attention_scaling(arch)
    if attention_scaling != 1.0:
        cos, sin = cos * attention_scaling, sin * attention_scaling
    cache = torch.stack([torch.cat([cos, cos], -1), torch.cat([-sin, sin], -1)], dim=1)  # [P, 2, D]
    return cache.to(device=device, dtype=dtype)


def apply_rope(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE. x: [T, heads, D]; cos_sin: [T, 2, D] (rows of the cache for `positions`)."""
    num_tokens, num_heads, head_dim = x.shape
    cos = cos_sin[:, 0:1, :]  # [T, 1, D], broadcast over heads
    sin = cos_sin[:, 1:2, :]
    swapped = x.view(num_tokens, num_heads, 2, head_dim // 2).flip(2).view(num_tokens, num_heads, head_dim)
    return torch.addcmul(x * cos, swapped, sin)
