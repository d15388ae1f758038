"""Micro-benchmark: the embedded model's linear shapes on CPU, float F.linear vs PyTorch's weight-only
int8 / int4 ops (`python -m benchmarks.cpu_quant_linear`). Prints ms per call and weight bytes; the
numbers pick the default path of `tidal.models.cpu_quant`."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from tidal.models import cpu_quant

# (name, out_features, in_features) of SmolLM2-135M: fused qkv (576 + 2*192), o, gate_up, down, LM head
SHAPES = (("qkv", 960, 576), ("o", 576, 576), ("gate_up", 3072, 576), ("down", 576, 1536),
          ("lm_head", 49152, 576))
TOKENS = (1, 8, 32)


def _time(fn, budget_s: float = 0.15) -> float:
    """Median-free mean ms over enough calls to fill `budget_s` after a warm-up."""
    fn()
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed > budget_s and calls >= 3:
            return 1000 * elapsed / calls


def _variants(weight: torch.Tensor):
    """(label, weight bytes, fn(x)) for each path; x arrives in fp32 and is cast as the path needs."""
    bf16 = weight.to(torch.bfloat16)
    yield "fp32", weight.numel() * 4, lambda x: F.linear(x, weight)
    yield "bf16", bf16.numel() * 2, lambda x: F.linear(x, bf16)
    for dtype in (torch.float32, torch.bfloat16):
        q8 = cpu_quant.QuantLinear.from_float(weight, "int8", dtype=dtype)
        yield f"int8/{str(dtype)[6:]}", q8.nbytes(), q8
    for group in (32, 64, 128):
        if weight.shape[1] % group:
            continue
        for dtype in (torch.float32, torch.bfloat16):
            q4 = cpu_quant.QuantLinear.from_float(weight, "int4", group_size=group, dtype=dtype)
            yield f"int4g{group}/{str(dtype)[6:]}", q4.nbytes(), q4


def main() -> None:
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'shape':>8} {'path':>15} {'MiB':>7} " + " ".join(f"{'M=' + str(m):>8}" for m in TOKENS))
    for name, out_f, in_f in SHAPES:
        weight = torch.randn(out_f, in_f) * 0.02
        for label, nbytes, fn in _variants(weight):
            cells = []
            for m in TOKENS:
                x = torch.randn(m, in_f)
                if "bf16" in label:
                    x = x.to(torch.bfloat16)
                with torch.inference_mode():
                    cells.append(f"{_time(lambda x=x, fn=fn: fn(x)):8.3f}")
            print(f"{name:>8} {label:>15} {nbytes / 2**20:7.2f} " + " ".join(cells))


if __name__ == "__main__":
    main()
