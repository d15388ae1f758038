"""Load a llama-family model from a GGUF file (llama.cpp's format).

Metadata (read by `GGUFFile`) becomes a `ModelArch`; each tensor is dequantized to float32 (`gguf.quants.dequantize`),
renamed to its Hugging Face name and written into the model's fused parameters, one tensor at a
time. llama.cpp's converter interleaves the rows of attn_q / attn_k of `llama`-architecture
models (its RoPE rotates adjacent pairs, ours rotates halves), so those rows are put back.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from tidal.models.arch import ModelArch
from tidal.models.gguf_file import GGUFFile

SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3")

_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


def arch_from_gguf(reader: GGUFFile) -> ModelArch:
    """A `ModelArch` from the file's `{architecture}.*` and `tokenizer.ggml.*` metadata."""
    architecture = reader.get("general.architecture")
    if architecture not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture {architecture!r}; "
                         f"supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)}")

    def value(key, default=None):
        return reader.get(f"{architecture}.{key}", default)

    hidden_size = value("embedding_length")
    num_heads = value("attention.head_count")
    num_kv_heads = value("attention.head_count_kv", num_heads)
    if isinstance(num_kv_heads, list):  # per-layer counts; llama-family files repeat one value
        num_kv_heads = max(num_kv_heads)
    tensor_names = {t.name for t in reader.tensors}
    vocab_size = value("vocab_size") or len(reader.metadata["tokenizer.ggml.tokens"])
    head_dim = value("attention.key_length") or hidden_size // num_heads
    return ModelArch(
        architecture=architecture,
        hidden_size=hidden_size,
        num_layers=value("block_count"),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        intermediate_size=value("feed_forward_length"),
        vocab_size=vocab_size,
        rope_theta=float(value("rope.freq_base", 10000.0)),
        rope_scaling=_gguf_rope_scaling(reader, architecture),
        rms_norm_eps=float(value("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
        max_position_embeddings=value("context_length", 4096),
        bos_token_id=reader.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=_gguf_eos_ids(reader),
    )


def _gguf_rope_scaling(reader: GGUFFile, architecture: str) -> dict | None:
    """Llama 3.1 files carry `rope_freqs.weight` (a divisor per frequency) instead of parameters."""
    for tensor in reader.tensors:
        if tensor.name == "rope_freqs.weight":
            factors = np.asarray(tensor.data, dtype=np.float32).reshape(-1)
            return {"rope_type": "freq_factors", "factors": tuple(float(f) for f in factors)}
    scaling_type = reader.get(f"{architecture}.rope.scaling.type")
    if scaling_type in (None, "none"):
        return None
    if scaling_type == "linear":
        return {"rope_type": "linear", "factor": float(reader.get(f"{architecture}.rope.scaling.factor"))}
    raise ValueError(f"GGUF rope scaling {scaling_type!r} is not supported")


def _gguf_eos_ids(reader: GGUFFile) -> tuple[int, ...]:
    ids = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        token_id = reader.get(f"tokenizer.ggml.{key}")
        if token_id is not None and token_id not in ids:
            ids.append(int(token_id))
    return tuple(ids)


def hf_name(gguf_name: str) -> str | None:
    """GGUF tensor name -> Hugging Face name (None for tensors the model does not hold)."""
    match = _LAYER_NAME.match(gguf_name)
    if match:
        layer, part, kind = match.groups()
        target = _LAYER_TENSORS.get(part)
        return f"model.layers.{layer}.{target}.{kind}" if target else None
    base, _, kind = gguf_name.rpartition(".")
    target = _GLOBAL_TENSORS.get(base)
    return f"{target}.{kind}" if target else None


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Put llama.cpp's rows back in Hugging Face order.

    Within a head, HF row `a * head_dim / 2 + j` (half `a`, pair `j`) sits at GGUF row `2 * j + a`.
    [num_heads * head_dim, ...] viewed as [heads, head_dim / 2, 2, ...] -> swap the middle axes.
    """
    rows = weight.shape[0]
    half = rows // num_heads // 2
    return weight.reshape(num_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def load_gguf_weights(model, reader: GGUFFile) -> None:
    """Dequantize every tensor and write it into `model` (a `LlamaModel` built from this file)."""
    from gguf.quants import dequantize

    arch: ModelArch = model.arch
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        if name is None:
            continue
        try:
            weight = dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError:
            raise ValueError(f"GGUF tensor {tensor.name}: type {tensor.tensor_type.name} is not supported") from None
        if arch.architecture == "llama":
            if ".q_proj." in name:
                weight = unpermute_rope_rows(weight, arch.num_heads)
            elif ".k_proj." in name:
                weight = unpermute_rope_rows(weight, arch.num_kv_heads)
        weight = np.ascontiguousarray(weight)
        if not weight.flags.writeable:  # F32 tensors come back as views of the read-only mmap
            weight = weight.copy()
        model.load_weight(name, torch.from_numpy(weight))
    model.check_loaded()
