"""Load a llama-family model from a Hugging Face folder: config.json + *.safetensors.

Tensors are read one at a time from the (possibly sharded) safetensors files and copied straight
into the model's fused parameters, so peak memory is the model plus one tensor.
"""

from __future__ import annotations

import json
import os

from tidal.models.arch import ModelArch, arch_from_hf_config


def read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def arch_from_hf_folder(folder: str) -> ModelArch:
    config = read_json(os.path.join(folder, "config.json"))
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

    for path in safetensors_files(folder):
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                if model.weight_slot(name) is not None:
                    model.load_weight(name, f.get_tensor(name))
    model.check_loaded()
