"""`load_model`: from a `ModelConfig` to a ready `LlamaModel` with its shape, name and limits.

The model is built with empty parameters on the target device in the target dtype, then one
source fills them: a GGUF file, a Hugging Face folder, or dummy random weights. A tensor-parallel
rank builds and fills only its shard (`tp_rank`, `tp_size`), reading the same full checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tidal.config import ModelConfig, resolve_dtype
from tidal.models.arch import ModelArch, get_preset
from tidal.models.cpu_quant import SCHEMES as CPU_SCHEMES
from tidal.models.cpu_quant import quantize_model
from tidal.models.dummy import init_dummy_weights
from tidal.models.gguf_file import GGUFFile
from tidal.models.gguf_loader import arch_from_gguf, load_gguf_weights
from tidal.models.hf_loader import arch_from_hf_folder, load_hf_weights
from tidal.models.llama import LlamaModel
from tidal.models.source import ModelSource, resolve_model_source


@dataclass
class LoadedModel:
    model: LlamaModel
    arch: ModelArch
    name: str
    """Served model name: `ModelConfig.served_model_name`, else the model's own name."""
    max_model_len: int
    dtype: torch.dtype
    device: torch.device


def resolve_max_model_len(requested: int | None, arch: ModelArch) -> int:
    limit = arch.max_position_embeddings
    if arch.sliding_window and not arch.has_windowed_layers:  # a window no layer applies (old Mistral)
        limit = min(limit, arch.sliding_window)
    if requested is None:
        return limit
    if requested > limit:
        raise ValueError(f"max_model_len {requested} exceeds the model's limit of {limit} tokens")
    return requested


def load_model(model_config: ModelConfig, tp_rank: int = 0, tp_size: int = 1) -> LoadedModel:
    """Build and fill the model named by `model_config.model` (see `resolve_model_source`), or
    rank `tp_rank`'s shard of it."""
    source = resolve_model_source(model_config.model)
    dtype = resolve_dtype(model_config.dtype, model_config.device)
    device = torch.device(model_config.device)
    reader = GGUFFile(source.path) if source.kind == "gguf" else None
    arch = with_quantization(_read_arch(source, reader), model_config.quantization)
    max_model_len = resolve_max_model_len(model_config.max_model_len, arch)
    model = LlamaModel(arch, dtype, device, max_positions=max_model_len, tp_rank=tp_rank, tp_size=tp_size)
    if source.kind == "gguf":
        load_gguf_weights(model, reader)
    elif source.kind == "hf":
        load_hf_weights(model, source.path)
    else:
        init_dummy_weights(model, model_config.seed)
    if model_config.quantization in CPU_SCHEMES:  # weight-only int8 / int4 CPU linears, after the float load
        quantize_model(model, model_config.quantization, reader)
    model.eval()
    return LoadedModel(model=model, arch=arch, name=model_config.served_model_name or source.name,
                       max_model_len=max_model_len, dtype=dtype, device=device)


def read_arch(model_config: ModelConfig) -> ModelArch:
    """The model's shape alone (no weights read)."""
    source = resolve_model_source(model_config.model)
    arch = _read_arch(source, GGUFFile(source.path) if source.kind == "gguf" else None)
    return with_quantization(arch, model_config.quantization)


def with_quantization(arch: ModelArch, quantization: str | None) -> ModelArch:
    """`ModelConfig.quantization` applied: "fp8" makes a float model's dense linears FP8 (per-row
    scales); a checkpoint already in FP8 keeps its own layout."""
    if quantization is None or quantization in CPU_SCHEMES or arch.quantization is not None:
        return arch
    return arch.replace(quantization=quantization)


def _read_arch(source: ModelSource, reader) -> ModelArch:
    if source.kind == "gguf":
        return arch_from_gguf(reader)
    if source.kind == "hf":
        return arch_from_hf_folder(source.path)
    return get_preset(source.preset)
