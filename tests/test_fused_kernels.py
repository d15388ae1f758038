"""The fused decoder-layer kernels (`tidal.kernels.fused`) against their plain-torch references.

On a GPU the grid runs in bf16 and fp16 (marker `gpu`). Without one, a smaller grid runs on the
CPU under Triton's interpreter in a subprocess (TRITON_INTERPRET must be set before triton is
imported), so CI checks the kernels' logic too.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tidal.kernels.paged_attention import write_kv
from tidal.models.arch import ModelArch
from tidal.models.layers import apply_rope, rope_cos_sin_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def check_add_rms_norm(device: str, dtype: torch.dtype, sizes) -> None:
    from tidal.kernels import fused

    for tokens, n in sizes:
        x = torch.randn(tokens, n, device=device, dtype=dtype)
        residual = torch.randn(tokens, n, device=device, dtype=dtype)
        weight = torch.rand(n, device=device, dtype=dtype) + 0.5
        want_sum = residual.float() + x.float()
        want = torch.nn.functional.rms_norm(want_sum, (n,), weight.float(), 1e-5)
        res = residual.clone()
        out, summed = fused.add_rms_norm(x, res, weight, 1e-5)
        assert summed.data_ptr() == res.data_ptr()  # the sum is stored in place
        assert _rel(summed, want_sum) < 1e-2 and _rel(out, want) < 1e-2, (tokens, n)
        out, same = fused.add_rms_norm(x, None, weight, 1e-5)
        assert same is x
        assert _rel(out, torch.nn.functional.rms_norm(x.float(), (n,), weight.float(), 1e-5)) < 1e-2


def check_silu_and_mul(device: str, dtype: torch.dtype, sizes) -> None:
    from tidal.kernels import fused

    for tokens, n in sizes:
        gate_up = torch.randn(tokens, 2 * n, device=device, dtype=dtype)
        gate, up = gate_up.float().chunk(2, dim=-1)
        want = torch.nn.functional.silu(gate) * up
        assert _rel(fused.silu_and_mul(gate_up), want) < 1e-2, (tokens, n)


def check_rope_store_kv(device: str, dtype: torch.dtype, shapes) -> None:
    """Against the torch path: optional per-head norm, apply_rope on q and k, write_kv."""
    from tidal.kernels import fused

    for heads, kv_heads, head_dim, block_size, tokens, qk_norm in shapes:
        arch = ModelArch("llama", hidden_size=heads * head_dim, num_layers=1, num_heads=heads,
                         num_kv_heads=kv_heads, head_dim=head_dim, intermediate_size=8, vocab_size=8,
                         rope_theta=10000.0, max_position_embeddings=4096)
        cache = rope_cos_sin_cache(arch, 4096, dtype, device)
        num_blocks = tokens // block_size + 4
        qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, device=device, dtype=dtype)
        positions = torch.randint(0, 4096, (tokens,), device=device)
        slots = torch.randperm(num_blocks * block_size, device=device)[:tokens]
        slots[0] = -1  # a padding row stores nothing
        norm = (torch.rand(heads + kv_heads, head_dim, device=device, dtype=dtype) + 0.5) if qk_norm else None
        # Reference, in float32 from the same inputs.
        qk = qkv[:, :(heads + kv_heads) * head_dim].float().view(tokens, heads + kv_heads, head_dim)
        if norm is not None:
            qk = torch.nn.functional.rms_norm(qk, (head_dim,), None, 1e-6) * norm.float()
        qk = apply_rope(qk, cache.float().index_select(0, positions))
        v = qkv[:, (heads + kv_heads) * head_dim:].float().view(tokens, kv_heads, head_dim)
        shape = (kv_heads, num_blocks, block_size, head_dim)
        k_want, v_want = torch.zeros(shape, device=device), torch.zeros(shape, device=device)
        keep = slots >= 0
        write_kv(qk[keep, heads:], v[keep], k_want, v_want, slots[keep])
        k_cache = torch.zeros(shape, device=device, dtype=dtype)
        v_cache = torch.zeros(shape, device=device, dtype=dtype)
        fused.rope_store_kv(qkv, cache, positions, norm, 1e-6, heads, kv_heads, k_cache, v_cache, slots)
        q = qkv[:, :heads * head_dim].view(tokens, heads, head_dim)
        label = (heads, kv_heads, head_dim, block_size, tokens, qk_norm)
        assert _rel(q, qk[:, :heads]) < 1e-2, label
        assert _rel(k_cache, k_want) < 1e-2 and _rel(v_cache, v_want) < 1e-2, label
        assert float(k_cache.float().abs().sum()) > 0


GPU_SIZES = [(1, 576), (7, 4096), (300, 4096), (33, 8192), (5, 1000)]
GPU_ROPE = [(32, 8, 128, 16, 77, False), (32, 8, 128, 16, 5, True), (8, 2, 64, 32, 130, False),
            (16, 16, 64, 8, 40, True), (64, 8, 128, 16, 3, False), (4, 2, 16, 16, 20, True)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_kernels_on_gpu(dtype):
    torch.manual_seed(0)
    check_add_rms_norm("cuda", dtype, GPU_SIZES)
    check_silu_and_mul("cuda", dtype, GPU_SIZES)
    check_rope_store_kv("cuda", dtype, GPU_ROPE)


def test_fused_kernels_under_the_triton_interpreter():
    pytest.importorskip("triton")
    code = ("import torch; from tests import test_fused_kernels as t; torch.manual_seed(0); "
            "t.check_add_rms_norm('cpu', torch.bfloat16, [(3, 64), (2, 100)]); "
            "t.check_silu_and_mul('cpu', torch.bfloat16, [(3, 64), (2, 100)]); "
            "t.check_rope_store_kv('cpu', torch.bfloat16, [(4, 2, 16, 16, 9, False), (4, 1, 32, 8, 5, True)])")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": ROOT}
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
