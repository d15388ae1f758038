"""GPU microbenchmark of the fused MoE kernels (tidal/kernels/fused_moe.py) on one CUDA device.

Expert shapes (bf16, random weights, random router logits, so experts are hit about evenly):
  gpt-oss-120b    H=2880, I=2880, E=128, top-4, clamped SwiGLU with biases
  qwen3-30b-a3b   H=2048, I=768,  E=128, top-8, SiLU-and-mul
at 1, 16, 64, 256, 2048 and 8192 tokens. Per point: the fused path (`fused_experts`, pair sort
included) eager and, up to 256 tokens, replayed in a CUDA graph; the torch path of
`tidal.models.moe.grouped_experts` (one matmul pair per expert hit, a host sync); and two floors
from this card's measured ceilings: the bf16 matmul time of the FLOPs (2 * T * k * 3 * H * I)
and the HBM time of the bytes of the experts touched (each hit expert's w13 and w2 once) at the
measured copy bandwidth. Each point first checks the fused output against the torch path
(relative error < 2e-2, raises otherwise). Times: medians of `triton.testing.do_bench`.
Prints a table; writes JSON to $OUT/moe_gpu.json ($OUT defaults to benchmarks/results/).

    python -m benchmarks.moe_gpu            # on a CUDA machine, a few minutes
    python -m benchmarks.moe_gpu --smoke    # tiny shapes; on a CPU it runs the Triton interpreter
"""

from __future__ import annotations

import json
import os
import sys
import time
from functools import partial

SMOKE = "--smoke" in sys.argv
import torch  # does not import triton

if SMOKE and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # must be set before triton is imported

from tidal.kernels import fused_moe
from tidal.models.layers import clamped_swiglu, silu_and_mul
from tidal.models.moe import grouped_experts, kernel_activation, select_experts
from tidal.perf.ceilings import device_ceilings

if os.environ.get("TRITON_INTERPRET") == "1":
    from tidal.kernels import _triton_interp_compat

    _triton_interp_compat.apply()

# name: (experts, hidden, intermediate, top_k, activation, biases)
MODELS = {"gpt-oss-120b": (128, 2880, 2880, 4, partial(clamped_swiglu, alpha=1.702, limit=7.0), True),
          "qwen3-30b-a3b": (128, 2048, 768, 8, silu_and_mul, False)}
TOKENS = (1, 16, 64, 256, 2048, 8192)
GRAPH_MAX_TOKENS = 256  # decode batches: the ones a CUDA graph captures in serving


def timer(device: str):
    """Median seconds of fn(): do_bench on CUDA, wall clock on the CPU (smoke runs only)."""
    if device == "cuda":
        from triton.testing import do_bench
        return lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3

    def wall(fn):
        fn()
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    return wall


def experts(num_experts, hidden, inter, bias, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape, scale):
        return (scale * torch.randn(*shape, generator=g, device=device)).to(dtype)

    w13 = rand(num_experts, 2 * inter, hidden, scale=hidden ** -0.5)
    w2 = rand(num_experts, hidden, inter, scale=inter ** -0.5)
    if not bias:
        return w13, w2, (None, None)
    return w13, w2, (rand(num_experts, 2 * inter, scale=0.1), rand(num_experts, hidden, scale=0.1))


def graphed(fn, device: str):
    """fn captured once in a CUDA graph; the replay is what a decode step runs."""
    if device != "cuda":
        return None
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def bench_point(model, tokens, weights13, ceilings, device, dtype, seconds) -> dict:
    num_experts, hidden, inter, top_k, activation, _ = MODELS[model]
    w13, w2, (b13, b2) = weights13
    x = torch.randn(tokens, hidden, device=device).to(dtype)
    logits = torch.randn(tokens, num_experts, device=device)
    weights, ids = select_experts(logits, top_k, True)
    kernel = kernel_activation(activation)

    def fused():
        return fused_moe.fused_experts(x, weights, ids, w13, w2, kernel, b13, b2)

    def torch_path():
        return grouped_experts(x, weights, ids, w13, w2, activation, b13, b2)

    out, ref = fused(), torch_path()
    rel = float((out.float() - ref.float()).norm() / ref.float().norm())
    if not rel < 2e-2:
        raise AssertionError(f"{model} T={tokens}: fused vs torch relative error {rel:.3e}")
    hit = int(torch.unique(ids).numel())
    expert_bytes = hit * 3 * hidden * inter * w13.element_size()
    flops = 2 * tokens * top_k * 3 * hidden * inter
    row = {"model": model, "tokens": tokens, "experts_hit": hit, "rel_err_vs_torch": rel,
           "fused_us": seconds(fused) * 1e6, "torch_loop_us": seconds(torch_path) * 1e6}
    replay = graphed(fused, device) if tokens <= GRAPH_MAX_TOKENS else None
    row["fused_graph_us"] = seconds(replay) * 1e6 if replay else None
    if ceilings:
        row["matmul_floor_us"] = flops / (ceilings["bf16_matmul_TFLOPs"] * 1e12) * 1e6
        row["hbm_floor_us"] = expert_bytes / (ceilings["copy_GBps_read_plus_write"] * 1e9) * 1e6
        best = row["fused_graph_us"] or row["fused_us"]
        row["floor_over_fused"] = max(row["matmul_floor_us"], row["hbm_floor_us"]) / best
        row["TFLOPs"] = flops / (row["fused_us"] * 1e-6) / 1e12
        row["GBps"] = expert_bytes / (best * 1e-6) / 1e9
    return row


def print_table(rows):
    head = (f"{'model':<14} {'T':>5} {'fused us':>9} {'graph us':>9} {'torch us':>9} {'speedup':>7} "
            f"{'mm floor':>9} {'hbm floor':>9} {'floor/fused':>11} {'TFLOP/s':>8} {'GB/s':>7}")
    print(head)
    for r in rows:
        graph = f"{r['fused_graph_us']:9.1f}" if r["fused_graph_us"] else f"{'-':>9}"
        floors = (f"{r['matmul_floor_us']:9.1f} {r['hbm_floor_us']:9.1f} {r['floor_over_fused']:11.2f} "
                  f"{r['TFLOPs']:8.1f} {r['GBps']:7.0f}") if "hbm_floor_us" in r else ""
        print(f"{r['model']:<14} {r['tokens']:>5} {r['fused_us']:9.1f} {graph} {r['torch_loop_us']:9.1f} "
              f"{r['torch_loop_us'] / r['fused_us']:7.2f} {floors}")


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    seconds = timer(device)
    ceilings = device_ceilings(device, timer=seconds) if device == "cuda" and not SMOKE else {}
    models, tokens = MODELS, TOKENS
    if SMOKE:  # tiny experts, a few token counts
        models = {name: (8, 64, 32, k, act, bias) for name, (_, _, _, k, act, bias) in MODELS.items()}
        tokens = (1, 7, 33)
    MODELS.update(models)
    rows = []
    for model, (num_experts, hidden, inter, _, _, bias) in models.items():
        weights = experts(num_experts, hidden, inter, bias, dtype, device)
        for t in tokens:
            rows.append(bench_point(model, t, weights, ceilings, device, dtype, seconds))
        del weights
        if device == "cuda":
            torch.cuda.empty_cache()
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}; ceilings: {ceilings}")
    print_table(rows)
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "moe_gpu.json")
    with open(path, "w") as f:
        json.dump({"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "smoke": SMOKE,
                   "dtype": str(dtype), "ceilings": ceilings,
                   "block_configs": "fused_moe.block_config (a fixed table)", "rows": rows}, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
