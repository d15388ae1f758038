"""Weight-only quantized linears for CPU: `QuantLinear`, int8 per output row or int4 per group of inputs.

Why: on a CPU, decoding is bound by reading weights; PyTorch's weight-only kernels read 1 byte
(`aten._weight_int8pack_mm`) or half a byte (`aten._weight_int4pack_mm_for_cpu`) a weight instead of
4 (fp32), and the embedded SmolLM2 GGUF already ships its linears in 4 bits (Q4_0 / Q4_1), so they can
stay that way in memory instead of being dequantized to float32 (`benchmarks/cpu_quant_linear.py`).

Layouts (W [out, in], x [tokens, in], activations in float32 or bfloat16):
  int8  W ~= W8 [out, in] * scale [out]; symmetric, scale = row max / 127.
  int4  W[n, k] ~= (q[n, k] - 8) * scale[g, n] + zero[g, n], q in 0..15, g = k // group_size; the
        codes packed by `aten._convert_weight_to_int4pack_for_cpu`, scale and zero stacked [G, out, 2].
GGUF blocks map onto int4 without requantizing: Q4_1 (w = q * d + m per 32) is scale d, zero m + 8d;
Q4_0 (w = (q - 8) * d) is scale d, zero 0 (`gguf_q4_codes`). Other GGUF types are dequantized and
quantized like a float weight. `quantize_model` swaps a loaded float model's decoder linears for
`QuantLinear`s; the embeddings and the (tied) LM head stay float.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

SCHEMES = ("int8", "int4")
GGUF_GROUP = 32
"""Values per block of Q4_0 / Q4_1 (and the int4 group size used for them)."""
INT4_DEFAULT_GROUP = 32
MIN_SCALE = 1e-12


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [out, in] float -> (W8 int8 [out, in], scale float32 [out]), symmetric per row."""
    w = weight.to(torch.float32)
    scale = (w.abs().amax(dim=1) / 127.0).clamp_(min=MIN_SCALE)
    return torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8), scale


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W [out, in] float -> (codes uint8 [out, in] in 0..15, scale [out, G], zero [out, G]) per group,
    asymmetric (a group's min and max are on the grid), in the (q - 8) * scale + zero form."""
    out_f, in_f = weight.shape
    w = weight.to(torch.float32).reshape(out_f, in_f // group_size, group_size)
    lo, hi = w.amin(dim=2), w.amax(dim=2)
    scale = ((hi - lo) / 15.0).clamp_(min=MIN_SCALE)
    codes = torch.round((w - lo[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.uint8)
    return codes.reshape(out_f, in_f), scale, lo + 8.0 * scale


def gguf_q4_codes(data: np.ndarray, tensor_type: str, shape: tuple[int, int]
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw Q4_0 / Q4_1 blocks of a [rows, cols] tensor -> (codes uint8 [rows, cols], d float32
    [rows, cols / 32], m float32 [rows, cols / 32]) with w = codes * d + m exactly as gguf
    dequantizes (Q4_0: m = -8d). A block: fp16 d, (Q4_1: fp16 m), 16 bytes of nibbles, the low
    nibbles values 0..15, the high ones 16..31."""
    rows, cols = shape
    blocks = np.asarray(data, dtype=np.uint8).reshape(rows, cols // GGUF_GROUP, -1)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if tensor_type == "Q4_1":
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        nibbles = blocks[..., 4:]
    elif tensor_type == "Q4_0":
        m, nibbles = -8.0 * d, blocks[..., 2:]
    else:
        raise ValueError(f"not a 4-bit GGUF type: {tensor_type}")
    codes = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1)  # [rows, G, 32]
    return codes.reshape(rows, cols), d, m


class QuantLinear(nn.Module):
    """One linear's weight, int8 per row or int4 per group (see the module doc); called like
    `F.linear(x, W, bias)`. Built by `from_float` or `from_int4_codes`; not trainable."""

    def __init__(self, scheme: str, out_features: int, in_features: int, dtype: torch.dtype,
                 group_size: int = 0):
        super().__init__()
        if scheme not in SCHEMES:
            raise ValueError(f"CPU quantization is one of {SCHEMES}, got {scheme!r}")
        self.scheme, self.group_size, self.dtype = scheme, group_size, dtype
        self.out_features, self.in_features = out_features, in_features

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))

    @classmethod
    def from_float(cls, weight: torch.Tensor, scheme: str, group_size: int = INT4_DEFAULT_GROUP,
                   dtype: torch.dtype = torch.float32) -> QuantLinear:
        """Quantize a float W [out, in]; `dtype` is the activation dtype the kernels run in."""
        out_f, in_f = weight.shape
        if scheme == "int8":
            layer = cls("int8", out_f, in_f, dtype)
            w8, scale = quantize_int8(weight)
            layer.register_buffer("weight", w8)
            layer.register_buffer("scale", scale.to(dtype))
            return layer
        if in_f % group_size:
            raise ValueError(f"int4 group size {group_size} does not divide in_features {in_f}")
        codes, scale, zero = quantize_int4(weight, group_size)
        return cls.from_int4_codes(codes, scale, zero, group_size, dtype)

    @classmethod
    def from_int4_codes(cls, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                        dtype: torch.dtype = torch.float32) -> QuantLinear:
        """codes [out, in] (0..15), scale and zero [out, in / group_size]: W = (codes - 8) * scale + zero."""
        out_f, in_f = codes.shape
        layer = cls("int4", out_f, in_f, dtype, group_size)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
        layer.register_buffer("weight", packed)
        layer.register_buffer("scale_zero", torch.stack([scale.T, zero.T], dim=-1).to(dtype).contiguous())
        return layer

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(self.dtype)
        if self.scheme == "int8":
            out = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scale)
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.weight, self.group_size, self.scale_zero)
        out = out.to(x.dtype)
        if bias is not None:
            out = out + bias
        return out.view(*x.shape[:-1], self.out_features)

    def dequantized(self) -> torch.Tensor:
        """W [out, in] as the kernel sees it (in `self.dtype`): the layer applied to the identity."""
        eye = torch.eye(self.in_features, dtype=self.dtype)
        return self.forward(eye).T.contiguous()

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.scheme == "int4" else ""
        return f"{self.scheme}, out={self.out_features}, in={self.in_features}{group}, dtype={self.dtype}"


_LINEARS = (("qkv_weight", ("attn_q", "attn_k", "attn_v")), ("o_weight", ("attn_output",)),
            ("gate_up_weight", ("ffn_gate", "ffn_up")), ("down_weight", ("ffn_down",)))
"""A decoder layer's fused linear attributes and the GGUF tensors whose rows make each, in order."""


@torch.no_grad()
def quantize_model(model, scheme: str, reader=None, group_size: int = INT4_DEFAULT_GROUP) -> None:
    """Swap each decoder layer's dense linears (qkv, o, gate_up, down) for `QuantLinear`s built from the
    loaded float weights, or, for int4 from a GGUF `reader` whose tensors are all Q4_0 / Q4_1, straight
    from the file's blocks (exact). Single-rank CPU models only (the kernels are CPU ones)."""
    if model.shard.size != 1 or model.embed_tokens.device.type != "cpu":
        raise ValueError("--quantization int8/int4 runs on one CPU rank")
    dtype = torch.bfloat16 if model.embed_tokens.dtype == torch.bfloat16 else torch.float32
    for index, layer in enumerate(model.layers):
        for attr, gguf_parts in _LINEARS:
            weight = getattr(layer, attr)
            if weight is None or not isinstance(weight, torch.Tensor):
                continue
            codes = _gguf_int4(reader, index, gguf_parts, model.arch) if scheme == "int4" else None
            if codes is not None:
                quant = QuantLinear.from_int4_codes(*codes, GGUF_GROUP, dtype)
            else:
                quant = QuantLinear.from_float(weight, scheme, group_size, dtype)
            delattr(layer, attr)
            setattr(layer, attr, quant)


def _gguf_int4(reader, layer: int, parts: tuple[str, ...], arch):
    """(codes, scale, zero) of the rows of `parts` stacked, from Q4_0 / Q4_1 blocks; None when there is
    no reader or a part is stored in another type."""
    if reader is None:
        return None
    from tidal.models.gguf_loader import unpermute_rope_rows

    tensors = {t.name: t for t in reader.tensors}
    pieces = []
    for part in parts:
        tensor = tensors.get(f"blk.{layer}.{part}.weight")
        if tensor is None or tensor.tensor_type.name not in ("Q4_0", "Q4_1"):
            return None
        rows, cols = (int(n) for n in tensor.shape)
        codes, d, m = gguf_q4_codes(tensor.data, tensor.tensor_type.name, (rows, cols))
        if arch.architecture == "llama" and part in ("attn_q", "attn_k"):
            heads = arch.num_heads if part == "attn_q" else arch.num_kv_heads
            codes, d, m = (unpermute_rope_rows(a, heads) for a in (codes, d, m))
        pieces.append((codes, d, m))
    codes, d, m = (torch.from_numpy(np.ascontiguousarray(np.concatenate(a, axis=0))) for a in zip(*pieces))
    return codes, d, m + 8.0 * d
