"""MXFP4 weights, as gpt-oss checkpoints store their MoE experts: read, dequantized, or made FP8.

The format (OCP Microscaling MXFP4): a weight W [..., R, K] (R output rows, K input columns, K a
multiple of 32) is stored as two uint8 tensors beside each other in the safetensors files:
  NAME_blocks  [..., R, K/32, 16]  32 FP4 (e2m1) codes per block, two per byte, low nibble first
  NAME_scales  [..., R, K/32]      one E8M0 exponent per block
  W[..., r, 32 * g + j] = FP4_E2M1[code j of block g] * 2^(scales[..., r, g] - 127)
Every such value is a bf16 number (bf16 has E8M0's exponent range and FP4's two significant bits
fit its mantissa), so dequantizing to bf16 is exact. gpt-oss stores its experts so:
`model.layers.N.mlp.experts.gate_up_proj_blocks` [E, 2I, H/32, 16] (+ `_scales` [E, 2I, H/32]) and
`down_proj_blocks` [E, H, I/32, 16]; the biases and everything named by the config's
`quantization_config.modules_to_not_convert` (attention, router, embeddings, lm_head) are plain
bf16 tensors.

For the model's loader (`mxfp4_expert_tensors`, `mxfp4_checkpoint_tensors`) a pair becomes one
tensor named without the suffix (`...experts.gate_up_proj`) in the layout of a bf16 gpt-oss
checkpoint, input dim first: [E, K, R] (gate_up_proj [E, H, 2I] with gate and up columns
interleaved, down_proj [E, I, H]), as transformers loads it, so one weight mapping serves both
kinds of checkpoint. Work is done one expert at a time: besides the result, peak memory is one
expert's float32 values.

`mxfp4_to_fp8` is the other way to keep the experts small: e4m3 values with a float32 scale per
32-value block (exact: FP4 values times a power of two fit e4m3) or per row (exact but for values
more than ~14 binades below their row's largest, which round at e4m3's subnormal step).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from typing import Literal

import torch
import torch.nn.functional as F

BLOCK_SIZE = 32
"""Values per shared exponent (16 bytes of packed codes)."""
E8M0_BIAS = 127
FP4_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
"""Code -> value: sign bit, 2 exponent bits (bias 1), 1 mantissa bit; 0b0001 is the subnormal 0.5."""
FP4_MAX = 6.0
E4M3_MAX = 448.0
ROW_SCALE_HEADROOM = 6
"""Binades the per-row FP8 scale leaves above the row's largest block exponent: 6 * 2^6 = 384 <= 448."""
BLOCKS_SUFFIX, SCALES_SUFFIX = "_blocks", "_scales"
MXFP4_MODEL_TYPES = frozenset({"gpt_oss"})
"""Architectures whose MXFP4 checkpoints Tidal loads (dequantized); other quantized ones are refused."""

FP8Granularity = Literal["block", "row"]


def accepts_mxfp4(config: dict | None) -> bool:
    """Whether a config.json declaring MXFP4 is one Tidal loads: a gpt-oss model."""
    return bool(config) and config.get("model_type") in MXFP4_MODEL_TYPES


def _check_pair(blocks: torch.Tensor, scales: torch.Tensor) -> None:
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales are uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.dim() < 3 or blocks.shape[-1] != BLOCK_SIZE // 2 or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)}: "
                         f"expected blocks [..., R, G, {BLOCK_SIZE // 2}] and scales [..., R, G]")


def _byte_values(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[256, 2]: a byte's two FP4 values, low nibble first."""
    values = torch.tensor(FP4_E2M1, dtype=torch.float32, device=device)
    return torch.stack((values.repeat(16), values.repeat_interleave(16)), dim=-1).to(dtype)


def _block_values(blocks: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """blocks [R, G, 16] -> FP4 values [R, G, 32] before scaling: one table lookup per byte."""
    values = F.embedding(blocks.reshape(-1).to(torch.int32), _byte_values(dtype, blocks.device))
    return values.view(*blocks.shape[:-1], BLOCK_SIZE)


def _exponents(scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """scales [..., G] uint8 -> 2^(scale - 127) [..., G, 1] (255, E8M0's NaN, gives inf)."""
    return torch.exp2(scales.to(torch.float32) - E8M0_BIAS).to(dtype).unsqueeze(-1)


def _dequantize_rows(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One expert: blocks [R, G, 16], scales [R, G] -> [R, G * 32]. Computed in bf16 or float32, where
    every value and every power of two of E8M0 is exact (float16 is not: it is computed in float32)."""
    compute = dtype if dtype in (torch.bfloat16, torch.float32) else torch.float32
    values = _block_values(blocks, compute)
    return values.mul_(_exponents(scales, compute)).flatten(-2).to(dtype)


def _experts(blocks: torch.Tensor, scales: torch.Tensor) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(index, blocks [R, G, 16], scales [R, G]) per leading index (expert) of blocks [..., R, G, 16]."""
    flat_blocks = blocks.reshape(-1, *blocks.shape[-3:])
    flat_scales = scales.reshape(-1, *scales.shape[-2:])
    for index in range(flat_blocks.shape[0]):
        yield index, flat_blocks[index], flat_scales[index]


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16
                     ) -> torch.Tensor:
    """blocks [..., R, G, 16], scales [..., R, G] -> W [..., R, G * 32] in `dtype` (rows layout: one
    row per output feature, as `F.linear` takes it), computed one expert (leading index) at a time."""
    _check_pair(blocks, scales)
    *lead, rows, groups, _ = blocks.shape
    out = torch.empty(*lead, rows, groups * BLOCK_SIZE, dtype=dtype, device=blocks.device)
    flat_out = out.view(-1, rows, groups * BLOCK_SIZE)
    for index, expert_blocks, expert_scales in _experts(blocks, scales):
        flat_out[index].copy_(_dequantize_rows(expert_blocks, expert_scales, dtype))
    return out


def experts_from_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16
                       ) -> torch.Tensor:
    """blocks [E, R, G, 16], scales [E, R, G] -> [E, G * 32, R]: the tensor a bf16 gpt-oss checkpoint
    stores under the same name without `_blocks` (input dim first), one expert at a time."""
    _check_pair(blocks, scales)
    if blocks.dim() != 4:
        raise ValueError(f"MXFP4 expert blocks are [E, R, G, 16], got {tuple(blocks.shape)}")
    experts, rows, groups, _ = blocks.shape
    out = torch.empty(experts, groups * BLOCK_SIZE, rows, dtype=dtype, device=blocks.device)
    for index, expert_blocks, expert_scales in _experts(blocks, scales):
        out[index].copy_(_dequantize_rows(expert_blocks, expert_scales, dtype).T)
    return out


def mxfp4_to_fp8(blocks: torch.Tensor, scales: torch.Tensor, granularity: FP8Granularity = "block"
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """blocks [..., R, G, 16], scales [..., R, G] -> (W8 [..., R, G * 32] float8_e4m3fn, scale float32)
    with W ~= W8 * scale broadcast along rows (`dequantize_fp8`):
    - "block": scale [..., R, G], one per 32 columns: 2^(e - 127) itself; exact.
    - "row": scale [..., R, 1] = 2^(max e of the row - 127 - 6): exact for blocks within ~14 binades
      of the row's largest; below that values round to e4m3's subnormal step (error <= scale * 2^-10)."""
    _check_pair(blocks, scales)
    if granularity not in ("block", "row"):
        raise ValueError(f"FP8 scale granularity is 'block' or 'row', got {granularity!r}")
    *lead, rows, groups, _ = blocks.shape
    weight = torch.empty(*lead, rows, groups * BLOCK_SIZE, dtype=torch.float8_e4m3fn, device=blocks.device)
    scale_cols = groups if granularity == "block" else 1
    scale = torch.empty(*lead, rows, scale_cols, dtype=torch.float32, device=blocks.device)
    flat_weight = weight.view(-1, rows, groups * BLOCK_SIZE)
    flat_scale = scale.view(-1, rows, scale_cols)
    for index, expert_blocks, expert_scales in _experts(blocks, scales):
        values = _block_values(expert_blocks)  # [R, G, 32]
        if granularity == "block":
            flat_weight[index].copy_(values.flatten(-2).to(torch.float8_e4m3fn))
            flat_scale[index].copy_(_exponents(expert_scales).squeeze(-1))
        else:
            top = expert_scales.amax(dim=-1, keepdim=True).to(torch.float32)  # [R, 1]
            shift = torch.exp2(expert_scales.to(torch.float32) - top + ROW_SCALE_HEADROOM)  # [R, G]
            flat_weight[index].copy_((values * shift.unsqueeze(-1)).flatten(-2).to(torch.float8_e4m3fn))
            flat_scale[index].copy_(torch.exp2(top - E8M0_BIAS - ROW_SCALE_HEADROOM))
    return weight, scale


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32
                   ) -> torch.Tensor:
    """W8 [..., R, K] and its scale [..., R, K / n] (n columns per scale) -> W [..., R, K]."""
    repeat = weight.shape[-1] // scale.shape[-1]
    return (weight.to(torch.float32) * scale.repeat_interleave(repeat, dim=-1)).to(dtype)


def quantize_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [..., R, K] -> (blocks [..., R, K/32, 16], scales [..., R, K/32]), the OCP recipe: each
    block's exponent is floor(log2(its largest magnitude)) - 2 (FP4's largest exponent), values
    round to the nearest FP4 code and clamp at +-6. For tests and tools; checkpoints come quantized."""
    *lead, rows, cols = weight.shape
    if cols % BLOCK_SIZE:
        raise ValueError(f"MXFP4 needs the last dim to be a multiple of {BLOCK_SIZE}, got {cols}")
    values = weight.to(torch.float32).reshape(*lead, rows, cols // BLOCK_SIZE, BLOCK_SIZE)
    amax = values.abs().amax(dim=-1)  # [..., R, G]
    exponent = torch.where(amax > 0, torch.floor(torch.log2(amax)) - 2, torch.full_like(amax, -E8M0_BIAS))
    exponent = exponent.clamp(-E8M0_BIAS, E8M0_BIAS)
    scaled = (values / torch.exp2(exponent).unsqueeze(-1)).clamp(-FP4_MAX, FP4_MAX)
    lut = torch.tensor(FP4_E2M1[:8], dtype=torch.float32, device=weight.device)
    magnitude_code = (scaled.abs().unsqueeze(-1) - lut).abs().argmin(dim=-1)  # nearest of the 8 magnitudes
    codes = (magnitude_code | ((scaled < 0) & (magnitude_code > 0)).long() << 3).to(torch.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)  # [..., R, G, 16]
    return blocks.contiguous(), (exponent + E8M0_BIAS).to(torch.uint8)


def mxfp4_expert_tensors(name: str, get_tensor: Callable[[str], torch.Tensor],
                         has_tensor: Callable[[str], bool], dtype: torch.dtype = torch.bfloat16,
                         device: torch.device | str = "cpu") -> tuple[str, torch.Tensor] | None:
    """The loader's hook, per checkpoint tensor name: `X_blocks` (with `X_scales` beside it) gives
    ("X", the dequantized tensor in bf16 checkpoint layout, `experts_from_mxfp4`); `X_scales` gives
    None (read with its blocks); any other name gives (name, the tensor as stored). `get_tensor`
    reads a tensor by name from any shard, `has_tensor` says whether the checkpoint holds one; pairs
    are dequantized on `device` (a GPU does in milliseconds what takes a CPU core ~0.2 s per expert)."""
    for suffix, partner in ((BLOCKS_SUFFIX, SCALES_SUFFIX), (SCALES_SUFFIX, BLOCKS_SUFFIX)):
        if name.endswith(suffix) and has_tensor(name[:-len(suffix)] + partner):
            base = name[:-len(suffix)]
            if suffix == SCALES_SUFFIX:
                return None
            blocks, scales = get_tensor(name).to(device), get_tensor(base + SCALES_SUFFIX).to(device)
            return base, experts_from_mxfp4(blocks, scales, dtype)
    return name, get_tensor(name)


def mxfp4_checkpoint_tensors(paths: Iterable[str], wanted: Callable[[str], bool] = lambda name: True,
                             dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu"
                             ) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of the safetensors files `paths` that `wanted` accepts (asked
    with the name the model sees: `...gate_up_proj`, not its `_blocks`), each MXFP4 pair dequantized
    (`mxfp4_expert_tensors`, on `device`). Blocks and scales may lie in different shards."""
    from safetensors import safe_open

    with ExitStack() as stack:
        files = [stack.enter_context(safe_open(path, framework="pt", device="cpu")) for path in paths]
        where = {name: file for file in files for name in file.keys()}  # noqa: SIM118 (no __iter__)
        for file in files:
            for name in file.keys():  # noqa: SIM118
                base = name.removesuffix(BLOCKS_SUFFIX).removesuffix(SCALES_SUFFIX)
                paired = base + SCALES_SUFFIX in where and base + BLOCKS_SUFFIX in where
                if not wanted(base if paired else name):
                    continue
                pair = mxfp4_expert_tensors(name, lambda n: where[n].get_tensor(n), where.__contains__,
                                            dtype, device)
                if pair is not None:
                    yield pair
