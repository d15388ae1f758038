"""FP8 (e4m3) linear weights: `Fp8Linear`, the noun a quantized decoder linear is, and its load-time helpers.

A weight W [out, in] is held as W8 (float8_e4m3fn, 1 byte a weight) and a float32 scale with
W ~= W8 * scale, in one of two layouts (`ModelArch.quantization`):
  "fp8"        scale [out, 1]: one per output row. A per-tensor checkpoint scale is written into every
               row it covers (q, k and v keep their own scales inside the fused qkv weight), and
               `--quantization fp8` quantizes a float checkpoint per row at load (`quantize_rows`).
  "fp8-block"  scale [ceil(out / 128), ceil(in / 128)]: one per 128x128 block (DeepSeek-V3 / Qwen3 FP8
               checkpoints: `weight_block_size` [128, 128]).
Checkpoints (Hugging Face `quantization_config` {"quant_method": "fp8", "activation_scheme": "dynamic"})
store `NAME.weight` in float8_e4m3fn beside `NAME.weight_scale_inv` (transformers' name; despite it,
a multiplier: W = W8 * scale_inv) or `NAME.weight_scale` (vLLM's per-tensor checkpoints).

Forward (`Fp8Linear.forward`): activations are quantized per token (dynamic: e4m3 values and a float32
scale per row, `quantize_activations`), then
- CUDA, "fp8": one `torch._scaled_mm` with row-wise scales (token scales x weight-row scales);
- CUDA, "fp8-block": the weight is dequantized to the activation dtype block by block and multiplied
  in bf16 (simple and exact to the reference, not fast: a block-scaled FP8 GEMM is the next step);
- elsewhere (CPU): the reference, float32 math on the dequantized values, the same numbers the CUDA
  paths compute up to accumulation order.
The embeddings and the LM head are never quantized (as in vLLM).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FP8_DTYPE = torch.float8_e4m3fn
E4M3_MAX = 448.0
BLOCK = 128
"""Rows and columns per scale in the "fp8-block" layout (the only block size checkpoints use)."""
LAYOUTS = ("fp8", "fp8-block")
SCALE_SUFFIXES = (".weight_scale_inv", ".weight_scale")
MIN_SCALE = 1e-12
"""Floor of a computed scale, so an all-zero row or token quantizes to zeros, not NaN."""
DUMMY_CHUNK_ELEMENTS = 1 << 26
"""Dummy FP8 weights are drawn this many values at a time (a float32 chunk of 256 MiB at most)."""


def is_fp8(tensor: torch.Tensor) -> bool:
    return tensor.dtype == FP8_DTYPE


def scale_shape(out_features: int, in_features: int, layout: str) -> tuple[int, int]:
    if layout == "fp8":
        return out_features, 1
    if layout == "fp8-block":
        return -(-out_features // BLOCK), -(-in_features // BLOCK)
    raise ValueError(f"FP8 layout is one of {LAYOUTS}, got {layout!r}")


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [R, K] float -> (W8 [R, K] e4m3, scale [R, 1] float32): each row's largest magnitude maps to 448."""
    w = weight.to(torch.float32)
    scale = (w.abs().amax(dim=-1, keepdim=True) / E4M3_MAX).clamp_(min=MIN_SCALE)
    return (w / scale).clamp_(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE), scale


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, K] -> (x8 [T, K] e4m3, scale [T, 1] float32), per token (dynamic activation quantization)."""
    return quantize_rows(x)


def quantize_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [R, K] float -> (W8 [R, K] e4m3, scale [ceil(R/128), ceil(K/128)] float32), one scale per
    128x128 block (the last ones partial), as FP8 block checkpoints are made. For tests and tools."""
    rows, cols = weight.shape
    pad_r, pad_c = -rows % BLOCK, -cols % BLOCK
    w = F.pad(weight.to(torch.float32), (0, pad_c, 0, pad_r))
    blocks = w.view(w.shape[0] // BLOCK, BLOCK, w.shape[1] // BLOCK, BLOCK)  # [Rb, 128, Kb, 128]
    scale = (blocks.abs().amax(dim=(1, 3)) / E4M3_MAX).clamp_(min=MIN_SCALE)  # [Rb, Kb]
    w8 = (blocks / scale[:, None, :, None]).clamp_(-E4M3_MAX, E4M3_MAX).view_as(w)[:rows, :cols]
    return w8.to(FP8_DTYPE), scale


def dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W8 [R, K] and its scale ([R, 1] per row, or [ceil(R/128), ceil(K/128)] per block) -> W [R, K]."""
    rows, cols = weight.shape
    if scale.shape[-1] == 1 and scale.shape[0] == rows:
        full = scale
    else:
        full = scale.repeat_interleave(BLOCK, dim=0)[:rows].repeat_interleave(BLOCK, dim=1)[:, :cols]
    return (weight.to(torch.float32) * full).to(dtype)


def reference_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """The FP8 linear's math on any device, in float32: per-token quantized x times dequantized W."""
    x8, x_scale = quantize_activations(x.reshape(-1, x.shape[-1]))
    out = (x8.to(torch.float32) * x_scale) @ dequantize(weight, scale).T
    if bias is not None:
        out += bias.to(torch.float32)
    return out.to(x.dtype).view(*x.shape[:-1], weight.shape[0])


def scaled_mm_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """CUDA, per-row scales: x [T, K] -> [T, R] through `torch._scaled_mm` (row-wise scaling, Hopper+).
    W8 [R, K] row-major is the column-major [K, R] operand `_scaled_mm` wants."""
    x8, x_scale = quantize_activations(x.reshape(-1, x.shape[-1]))
    out = torch._scaled_mm(x8, weight.T, scale_a=x_scale, scale_b=scale.T, out_dtype=torch.bfloat16)
    if bias is not None:
        out += bias
    return out.to(x.dtype).view(*x.shape[:-1], weight.shape[0])


def block_dequant_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """CUDA, block scales: per-token quantized x times W dequantized to bf16 (a temporary the size of
    W in bf16), one bf16 GEMM. Correct; its speed is a bf16 GEMM plus the dequantization."""
    compute = torch.bfloat16 if x.dtype == torch.float32 else x.dtype
    x8, x_scale = quantize_activations(x.reshape(-1, x.shape[-1]))
    out = (x8.to(compute) @ dequantize(weight, scale, compute).T) * x_scale.to(compute)
    if bias is not None:
        out += bias
    return out.to(x.dtype).view(*x.shape[:-1], weight.shape[0])


def _scaled_mm_fits(weight: torch.Tensor) -> bool:
    """`_scaled_mm` needs both weight dims to be multiples of 16."""
    return weight.shape[0] % 16 == 0 and weight.shape[1] % 16 == 0


class Fp8Linear(nn.Module):
    """One linear's weight in FP8: `weight` [out, in] e4m3 and `weight_scale` (see the module doc).
    Allocated empty; a loader fills both (`scale_slot`, `load_float`) or dummy init does."""

    def __init__(self, out_features: int, in_features: int, layout: str, device: torch.device | str):
        super().__init__()
        self.layout = layout
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(scale_shape(out_features, in_features, layout),
                                                     dtype=torch.float32, device=device), requires_grad=False)

    @property
    def shape(self) -> torch.Size:
        return self.weight.shape

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if x.is_cuda and self.layout == "fp8" and _scaled_mm_fits(self.weight):
            return scaled_mm_linear(x, self.weight, self.weight_scale, bias)
        if x.is_cuda:
            return block_dequant_linear(x, self.weight, self.weight_scale, bias)
        return reference_linear(x, self.weight, self.weight_scale, bias)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.weight, self.weight_scale, dtype)

    def row_range(self, target: torch.Tensor) -> tuple[int, int]:
        """(first row, rows) of `self.weight` that `target` (a slice of whole rows of it) covers."""
        start = (target.data_ptr() - self.weight.data_ptr()) // self.weight.stride(0)
        return start, target.shape[0]

    def scale_slot_target(self, target: torch.Tensor, split_dim: int | None, name: str
                          ) -> tuple[torch.Tensor, int | None]:
        """(the scale entries of the weight rows `target`, how ranks split them) for a checkpoint scale.
        Block scales go with whole 128-row blocks: a slice that splits one is refused."""
        start, rows = self.row_range(target)
        if self.layout == "fp8":
            return self.weight_scale[start:start + rows], 0 if split_dim == 0 else None
        end = start + rows
        if start % BLOCK or (end % BLOCK and end != self.weight.shape[0]):
            raise ValueError(f"{name}: rows {start}..{end} of an FP8 weight with {BLOCK}x{BLOCK} block scales "
                             f"split a block (q/k/v sizes and tensor-parallel shards must be multiples of "
                             f"{BLOCK})")
        return self.weight_scale[start // BLOCK:-(-end // BLOCK)], split_dim

    @torch.no_grad()
    def load_float(self, target: torch.Tensor, tensor: torch.Tensor) -> None:
        """Quantize a float checkpoint tensor (this rank's slice) into the weight rows `target`, per row."""
        if self.layout != "fp8":
            raise ValueError("a float checkpoint tensor can only be quantized per row (layout 'fp8')")
        start, rows = self.row_range(target)
        w8, scale = quantize_rows(tensor.to(target.device))
        target.copy_(w8)
        self.weight_scale[start:start + rows].copy_(scale)

    @torch.no_grad()
    def fill_dummy(self, magnitude: float, generator: torch.Generator) -> None:
        """Dummy weights uniform in [-magnitude, magnitude], drawn straight into FP8 in chunks of rows,
        so no float copy of the weight exists at once."""
        rows, cols = self.weight.shape
        chunk = max(1, DUMMY_CHUNK_ELEMENTS // cols)
        for start in range(0, rows, chunk):
            part = self.weight[start:start + chunk]
            values = torch.empty(part.shape, dtype=torch.float32, device=part.device)
            part.copy_(values.uniform_(-E4M3_MAX, E4M3_MAX, generator=generator))
        self.weight_scale.fill_(magnitude / E4M3_MAX)


def linear_weight(out_features: int, in_features: int, dtype: torch.dtype, device: torch.device | str,
                  layout: str | None) -> nn.Parameter | Fp8Linear:
    """A decoder linear's weight: a plain empty parameter, or an `Fp8Linear` when `layout` is set."""
    if layout is None:
        return nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device),
                            requires_grad=False)
    return Fp8Linear(out_features, in_features, layout, device)


def linear(x: torch.Tensor, weight: torch.Tensor | Fp8Linear, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear` for either kind of weight `linear_weight` makes, or a CPU `QuantLinear` (`tidal.models.cpu_quant`)."""
    if isinstance(weight, nn.Module):
        return weight(x, bias)
    return F.linear(x, weight, bias)


def canonical_scale_name(name: str) -> str:
    """`X.weight_scale_inv` and `X.weight_scale` are the same slot: both count as `X.weight_scale`."""
    return name[:-len("_inv")] if name.endswith(".weight_scale_inv") else name
