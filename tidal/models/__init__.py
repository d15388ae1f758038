"""Llama-family models: shapes (`ModelArch`), the model, and loaders (GGUF, HF folder, dummy).

Names are imported lazily so that `tidal.models.arch` and `tidal.models.source` (no torch) stay
cheap for the frontend.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ModelArch": "tidal.models.arch",
    "PRESETS": "tidal.models.arch",
    "get_preset": "tidal.models.arch",
    "param_count": "tidal.models.arch",
    "active_param_count": "tidal.models.arch",
    "LlamaModel": "tidal.models.llama",
    "kv_cache_shape": "tidal.models.llama",
    "kv_bytes_per_token": "tidal.models.llama",
    "LoadedModel": "tidal.models.loader",
    "load_model": "tidal.models.loader",
    "ModelSource": "tidal.models.source",
    "resolve_model_source": "tidal.models.source",
    "embedded_gguf_path": "tidal.models.source",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tidal.models' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
