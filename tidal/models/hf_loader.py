"""Load a llama-family model from a Hugging Face folder: config.json + *.safetensors.

Tensors are read one at a time from the (possibly sharded) safetensors files and copied straight
into the model's fused parameters, so peak memory is the model plus one tensor.

Quantized checkpoints (FP8, AWQ, GPTQ, bitsandbytes, compressed-tensors, ...) are refused by name
(`check_not_quantized`) before anything loads: their tensors are packed integers or low-precision
values with scales beside them, which the loader would copy as if they were weights (FP8: scales
ignored, wrong outputs) or fail on with a shape error (AWQ, GPTQ). The one exception is gpt-oss's
MXFP4 experts, which `tidal.models.mxfp4` dequantizes at load (`accepts_mxfp4`).
"""

from __future__ import annotations

import json
import os

from tidal.models.arch import ModelArch, arch_from_hf_config
from tidal.models.mxfp4 import accepts_mxfp4, mxfp4_checkpoint_tensors


def read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


QUANTIZATION_FILES = {"quantize_config.json": "gptq", "quant_config.json": "awq", "hf_quant_config.json": "modelopt"}
"""Files older quantizers (AutoGPTQ, AutoAWQ) and NVIDIA ModelOpt write beside config.json."""


def quantization_method(folder: str, config: dict | None = None) -> str | None:
    """The quantization a Hugging Face folder declares (`quant_method` of config.json's
    `quantization_config` or `compression_config`, also inside a `text_config`, or one of
    `QUANTIZATION_FILES`); None for a checkpoint of plain floating-point weights."""
    config = read_json(os.path.join(folder, "config.json")) if config is None else config
    for section in (config or {}, (config or {}).get("text_config") or {}):
        for key in ("quantization_config", "compression_config"):
            declared = section.get(key)
            if declared:
                return _method_name(declared)
    for name, method in QUANTIZATION_FILES.items():
        if os.path.isfile(os.path.join(folder, name)):
            quant = read_json(os.path.join(folder, name)) or {}
            return _method_name(quant) if quant.get("quant_method") else method
    return None


def _method_name(declared: object) -> str:
    if not isinstance(declared, dict):
        return "unknown method"
    if declared.get("quant_method"):
        return str(declared["quant_method"])
    if declared.get("load_in_4bit") or declared.get("load_in_8bit"):
        return "bitsandbytes"
    return str(declared.get("format") or "unknown method")


def check_not_quantized(folder: str, config: dict | None = None) -> None:
    """Raises ValueError naming the method when the folder holds a quantized checkpoint (but a
    gpt-oss MXFP4 one)."""
    config = read_json(os.path.join(folder, "config.json")) if config is None else config
    method = quantization_method(folder, config)
    if method is not None and not (method == "mxfp4" and accepts_mxfp4(config)):
        raise ValueError(f"{folder}: quantized checkpoints ({method}) are not supported yet; Tidal loads "
                         "safetensors of float32, bfloat16 or float16 weights, or a GGUF file (its "
                         "quantized tensors are dequantized at load): serve the unquantized model or a GGUF "
                         "of it")


def arch_from_hf_folder(folder: str) -> ModelArch:
    config = read_json(os.path.join(folder, "config.json"))
    check_not_quantized(folder, config)
    generation_config = read_json(os.path.join(folder, "generation_config.json"))
    return arch_from_hf_config(config, generation_config)


def safetensors_files(folder: str) -> list[str]:
    """The shards named by model.safetensors.index.json, else every *.safetensors in the folder."""
    index = read_json(os.path.join(folder, "model.safetensors.index.json"))
    if index is not None:
        names = sorted(set(index["weight_map"].values()))
    else:
        names = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    if not names:
        raise ValueError(f"no *.safetensors files in {folder} (other weight formats are not supported)")
    return [os.path.join(folder, n) for n in names]


def load_hf_weights(model, folder: str) -> None:
    """Copy every tensor of the folder's safetensors files into `model` (a `LlamaModel`)."""
    from safetensors import safe_open

    if quantization_method(folder) == "mxfp4":  # check_not_quantized let only gpt-oss's through
        for name, tensor in mxfp4_checkpoint_tensors(safetensors_files(folder),
                                                     wanted=lambda name: model.weight_slot(name) is not None,
                                                     device=getattr(model, "device", "cpu")):
            model.load_weight(name, tensor)
        model.check_loaded()
        return
    for path in safetensors_files(folder):
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                if model.weight_slot(name) is not None:
                    model.load_weight(name, f.get_tensor(name))
    model.check_loaded()
