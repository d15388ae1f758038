"""Offline engine benchmark on the CPU: throughput and per-step profile, no HTTP in the way.

Adds N requests of `--input-len` random tokens (distinct, so no prefix hits) with
`--output-len` tokens each (ignore_eos), runs the engine to completion with at most
`--concurrency` in flight, and prints output tokens/s, step-time percentiles (mixed steps and
decode-only steps) and the top torch ops of a profiled decode step, plus the matmul ceiling of
this CPU measured in the same run (bf16/fp32 GEMM at the model's shapes).

    python benchmarks/engine_cpu.py --dtype bfloat16 --concurrency 32 --token-budget 128
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

from tidal import LLM, SamplingParams
from tidal.protocol import AddRequest


def gemm_ceiling(dtype: torch.dtype, m: int = 256, k: int = 576, n: int = 1536) -> float:
    """GFLOP/s of one [m, k] x [k, n] matmul, the size of the model's MLP at `m` tokens."""
    a, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
    for _ in range(5):
        torch.nn.functional.linear(a, w)
    iters = 100
    start = time.perf_counter()
    for _ in range(iters):
        torch.nn.functional.linear(a, w)
    return 2 * m * k * n * iters / (time.perf_counter() - start) / 1e9


def run(args) -> dict:
    llm = LLM(args.model, dtype=args.dtype, token_budget=args.token_budget, max_num_seqs=args.concurrency)
    engine = llm.engine
    rng = random.Random(0)
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    pending = [[rng.randrange(100, 40000) for _ in range(args.input_len)] for _ in range(args.num_requests)]
    steps, produced = [], 0
    start = time.perf_counter()
    next_id = 0
    while pending or engine.has_work():
        while pending and len(engine.scheduler.requests) < args.concurrency:
            engine.add_request(AddRequest(request_id=str(next_id), prompt_token_ids=pending.pop(), sampling_params=params))
            next_id += 1
        num_prefill = sum(1 for r in engine.scheduler.running + list(engine.scheduler.waiting)
                          if r.num_computed_tokens < r.num_tokens - 1)
        t = time.perf_counter()
        deltas = engine.step()
        steps.append((time.perf_counter() - t, num_prefill > 0))
        produced += sum(len(d.new_token_ids) for d in deltas)
    wall = time.perf_counter() - start
    mixed = sorted(s for s, p in steps if p)
    decode = sorted(s for s, p in steps if not p)
    pct = lambda xs, q: 1e3 * xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")  # noqa: E731
    return {"dtype": args.dtype, "concurrency": args.concurrency, "token_budget": args.token_budget,
            "output_tokens_per_s": produced / wall, "steps": len(steps),
            "mixed_step_ms_p50": pct(mixed, 0.5), "mixed_step_ms_p99": pct(mixed, 0.99),
            "decode_step_ms_p50": pct(decode, 0.5), "decode_step_ms_p99": pct(decode, 0.99),
            "mean_step_ms": 1e3 * statistics.mean(s for s, _ in steps)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--token-budget", type=int, default=128)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    result = run(args)
    result["gemm_ceiling_gflops"] = gemm_ceiling(dtype)
    result["threads"] = torch.get_num_threads()
    for key, value in result.items():
        print(f"{key:>24}: {value:.1f}" if isinstance(value, float) else f"{key:>24}: {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
