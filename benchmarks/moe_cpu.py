"""The MoE block on the CPU: `tidal.models.moe.moe_forward` (tokens grouped by expert, one matmul
pair per expert that has tokens) against a naive loop over tokens and each token's top-k experts.

Shape: the `small-qwen3-moe` preset's experts (hidden 1024, 64 experts, top-8, 384 intermediate
rows each), float32, random weights and inputs, one torch thread. Per batch of tokens: median
milliseconds over `--iters` calls. Prints a table and writes JSON to --out.

    python -m benchmarks.moe_cpu [--tokens 1,64] [--iters 20] [--out benchmarks/results/moe_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from tidal.models.arch import get_preset
from tidal.models.moe import moe_forward, select_experts


def naive_moe(hidden, router_logits, w13, w2, top_k, renormalize):
    """One token at a time, one expert at a time: what `moe_forward` replaces."""
    weights, experts = select_experts(router_logits, top_k, renormalize)
    inter = w2.shape[2]
    out = torch.zeros_like(hidden)
    for t in range(hidden.shape[0]):
        for weight, e in zip(weights[t].tolist(), experts[t].tolist()):
            gate_up = F.linear(hidden[t], w13[e])
            out[t] += weight * F.linear(F.silu(gate_up[:inter]) * gate_up[inter:], w2[e])
    return out


def median_ms(fn, iters: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small-qwen3-moe")
    parser.add_argument("--tokens", default="1,64")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", default="benchmarks/results/moe_cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    arch = get_preset(args.preset)
    g = torch.Generator().manual_seed(0)
    e, h, i = arch.num_experts, arch.hidden_size, arch.moe_intermediate_size
    w13 = torch.randn(e, 2 * i, h, generator=g) / h ** 0.5
    w2 = torch.randn(e, h, i, generator=g) / i ** 0.5
    gate = torch.randn(e, h, generator=g) / h ** 0.5
    rows = []
    print(f"{args.preset}: hidden {h}, {e} experts, top-{arch.num_experts_per_tok}, "
          f"intermediate {i}, fp32, 1 thread")
    print("| tokens | moe_forward ms | naive per-token ms | speed-up |\n|---:|---:|---:|---:|")
    with torch.inference_mode():
        for num_tokens in (int(t) for t in args.tokens.split(",")):
            hidden = torch.randn(num_tokens, h, generator=g)
            logits = F.linear(hidden, gate)
            call = (hidden, logits, w13, w2, arch.num_experts_per_tok, arch.norm_topk_prob)
            torch.testing.assert_close(moe_forward(*call), naive_moe(*call), rtol=1e-4, atol=1e-4)
            grouped = median_ms(lambda call=call: moe_forward(*call), args.iters)
            naive = median_ms(lambda call=call: naive_moe(*call), args.iters)
            rows.append({"tokens": num_tokens, "moe_forward_ms": grouped, "naive_ms": naive})
            print(f"| {num_tokens} | {grouped:.2f} | {naive:.2f} | {naive / grouped:.1f}x |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"preset": args.preset, "threads": 1, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
