"""FP8 linear on one GPU: the card's FP8 and bf16 matmul ceilings, then `tidal.models.fp8.Fp8Linear`
(per-row scales through `torch._scaled_mm`, and 128x128 block scales) against bf16 `F.linear` at
Llama-3.1-70B's linear shapes, M = 1, 64 and 8192 tokens, with each result's error against the float32
reference (`reference_linear`). Prints a table and writes JSON.

    python -m benchmarks.fp8_gpu [--out benchmarks/results/fp8_gpu.json]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from tidal.models.fp8 import Fp8Linear, quantize_blocks, quantize_rows, reference_linear
from tidal.perf.ceilings import cuda_timer, device_ceilings

SHAPES_70B = {"qkv": (10240, 8192), "o": (8192, 8192), "gate_up": (57344, 8192), "down": (8192, 28672)}
"""Llama-3.1-70B, one GPU: (out, in) of each fused linear."""
TOKENS = (1, 64, 8192)


def fp8_matmul_tflops(n: int = 8192) -> float:
    """The card's FP8 e4m3 matmul rate (row-wise scaled `_scaled_mm`, bf16 out)."""
    a = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn)
    sa, sb = torch.ones(n, 1, device="cuda"), torch.ones(1, n, device="cuda")
    seconds = cuda_timer()(lambda: torch._scaled_mm(a, b.T, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16))
    return 2 * n ** 3 / seconds / 1e12


def _linear(w: torch.Tensor, layout: str) -> Fp8Linear:
    linear = Fp8Linear(*w.shape, layout, "cuda")
    w8, scale = quantize_rows(w) if layout == "fp8" else quantize_blocks(w)
    linear.weight.copy_(w8)
    linear.weight_scale.copy_(scale)
    return linear


def _error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).norm() / ref.norm())


def measure(name: str, out_features: int, in_features: int, tokens: int) -> dict:
    timer = cuda_timer(iters=20, warmup=5)
    w = torch.randn(out_features, in_features, device="cuda") * 0.02
    x = torch.randn(tokens, in_features, device="cuda", dtype=torch.bfloat16)
    w16 = w.to(torch.bfloat16)
    row = {"linear": name, "M": tokens, "N": out_features, "K": in_features,
           "bf16_ms": timer(lambda: F.linear(x, w16)) * 1e3}
    flops = 2 * tokens * out_features * in_features
    for layout in ("fp8", "fp8-block"):
        linear = _linear(w, layout)
        ms = timer(lambda linear=linear: linear(x)) * 1e3
        ref = reference_linear(x.float(), linear.weight, linear.weight_scale)
        row[f"{layout}_ms"], row[f"{layout}_err"] = ms, _error(linear(x), ref)
        row[f"{layout}_TFLOPs"] = flops / ms / 1e9
    row["bf16_TFLOPs"] = flops / row["bf16_ms"] / 1e9
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the results here as JSON")
    args = parser.parse_args()
    ceilings = {**device_ceilings("cuda"), "fp8_matmul_TFLOPs": fp8_matmul_tflops()}
    rows = [measure(name, n, k, m) for name, (n, k) in SHAPES_70B.items() for m in TOKENS]
    print(f"{torch.cuda.get_device_name()}: bf16 {ceilings['bf16_matmul_TFLOPs']:.0f} TFLOP/s, "
          f"fp8 {ceilings['fp8_matmul_TFLOPs']:.0f} TFLOP/s, copy {ceilings['copy_GBps_read_plus_write']:.0f} GB/s")
    print(f"{'linear':>8} {'M':>5} {'bf16 ms':>8} {'fp8 ms':>8} {'speedup':>7} {'blk ms':>8} "
          f"{'fp8 err':>8} {'blk err':>8} {'fp8 TF/s':>8}")
    for r in rows:
        print(f"{r['linear']:>8} {r['M']:>5} {r['bf16_ms']:8.3f} {r['fp8_ms']:8.3f} "
              f"{r['bf16_ms'] / r['fp8_ms']:7.2f} {r['fp8-block_ms']:8.3f} {r['fp8_err']:8.1e} "
              f"{r['fp8-block_err']:8.1e} {r['fp8_TFLOPs']:8.0f}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"device": torch.cuda.get_device_name(), "ceilings": ceilings, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
