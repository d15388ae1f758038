"""The attention entry points the model calls: `store_kv` and `attend`.

They dispatch on `AttentionMetadata.backend`: `triton` runs the Triton kernels of
`triton_attention.py` (CUDA), `torch` the plain-torch implementation of `paged_attention.py`
(any device, and the reference the kernels are tested against).
"""

from __future__ import annotations

import torch

from tidal.kernels import paged_attention as torch_impl
from tidal.kernels.paged_attention import AttentionMetadata


def triton_available() -> bool:
    try:
        from tidal.kernels import triton_attention
    except ImportError:
        return False
    return triton_attention.HAS_TRITON


def resolve_backend(requested: str, device: torch.device) -> str:
    """`auto` -> `triton` on CUDA when Triton is importable, else `torch`."""
    if requested not in ("auto", "torch", "triton"):
        raise ValueError(f"unknown attention backend {requested!r}; use auto, torch or triton")
    if requested == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if requested == "triton" and not (device.type == "cuda" and triton_available()):
        raise ValueError("the triton attention backend needs a CUDA device and the triton package")
    return requested


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             meta: AttentionMetadata) -> None:
    """Write this step's keys and values ([T, kv_heads, head_dim]) at `meta.slot_mapping`."""
    if meta.backend == "triton":
        from tidal.kernels import triton_attention
        triton_attention.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    else:
        torch_impl.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)


def attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
           scale: float, window: int | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of this step's queries [T, H, D] over the cache -> [T, H, D].

    window: a query sees only the last `window` positions (itself included); None: all of them.
    sinks: [H] float32, a logit per head that joins the softmax's denominator (gpt-oss); None: none.
    Both are per layer, so they are arguments, not metadata."""
    if meta.backend != "triton":
        return torch_impl.paged_attention(q, k_cache, v_cache, meta, scale, window, sinks)
    from tidal.kernels import triton_attention
    out = torch.empty_like(q)
    nd = meta.num_decode_tokens
    if nd:
        triton_attention.decode_attention(q[:nd], k_cache, v_cache, meta.decode_block_tables,
                                          meta.decode_context_lens, scale, meta.num_splits, out=out[:nd],
                                          window=window, sinks=sinks)
    if meta.prefill_context_lens is not None and meta.prefill_context_lens.shape[0]:
        triton_attention.prefill_attention(q[nd:], k_cache, v_cache, meta.prefill_cu_query_lens,
                                           meta.prefill_context_lens, meta.prefill_block_tables,
                                           meta.prefill_max_query_len, scale, out=out[nd:],
                                           window=window, sinks=sinks)
    return out
