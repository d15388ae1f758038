"""The engine's cost per step on the CPU, no HTTP in the way.

Host overhead (default): the engine's own cost per step (scheduler, KV blocks, step inputs, outputs)
with a runner that costs nothing, what a GPU step pays on the host besides the model. B requests with
C-token prompts decode together (prefix caching on, block size 16); after warm-up the median wall
time of a step over several rounds is printed per batch size.

    python -m benchmarks.engine_overhead [--batches 64,256] [--context 1024] [--steps 200]

`--model` (the whole engine on a CPU model; `embedded`: the embedded SmolLM2): `--num-requests` of
`--input-len` random tokens (distinct, so no prefix hits), `--output-len` tokens each (ignore_eos), at
most `--concurrency` in flight; prints output tokens/s, step-time percentiles (mixed steps and
decode-only steps) and this CPU's GEMM rate at the model's MLP shape, measured in the same run.

    python -m benchmarks.engine_overhead --model embedded --dtype bfloat16 --concurrency 32 --token-budget 256
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import numpy as np
import torch

from tidal import LLM
from tidal.config import CacheConfig, EngineConfig, SchedulerConfig
from tidal.engine.batch import build_step_batch
from tidal.engine.engine import EngineCore, ServedModel
from tidal.perf.ceilings import gemm_gflops
from tidal.protocol import AddRequest, SamplingParams


class FreeRunner:
    """Builds the step's inputs as the real runner does, samples a fixed token, runs no model."""

    num_blocks = 65536
    block_size = 16

    def execute(self, out, eos_token_ids):
        decodes = [s for s in out.scheduled if s.num_new_tokens == 1]
        prefills = [s for s in out.scheduled if s.num_new_tokens > 1]
        build_step_batch(decodes, prefills, self.block_size).pack()
        return {s.request.request_id: 5 for s in out.scheduled if s.samples}, {}


def step_ms(batch: int, context: int, steps: int) -> float:
    config = EngineConfig(cache=CacheConfig(num_blocks=FreeRunner.num_blocks),
                          scheduler=SchedulerConfig(token_budget=8192, max_num_seqs=batch))
    engine = EngineCore(config, FreeRunner(), ServedModel("free", vocab_size=1000, max_model_len=16384))
    rng = np.random.default_rng(0)
    for i in range(batch):
        engine.add_request(AddRequest(request_id=str(i), prompt_token_ids=rng.integers(10, 900, context).tolist(),
                                      sampling_params=SamplingParams(max_tokens=10 * steps, ignore_eos=True)))
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running) \
            or engine.scheduler.waiting:
        engine.step()
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(steps // 5):
            engine.step()
        rounds.append((time.perf_counter() - start) / (steps // 5) * 1e3)
    return statistics.median(rounds)


def model_run(args) -> dict:
    """The whole engine on a CPU model: output tokens/s and step times, mixed and decode-only."""
    llm = LLM(None if args.model == "embedded" else args.model, dtype=args.dtype, token_budget=args.token_budget,
              max_num_seqs=args.concurrency)
    engine = llm.engine
    rng = random.Random(0)
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    pending = [[rng.randrange(100, 40000) for _ in range(args.input_len)] for _ in range(args.num_requests)]
    steps, produced, next_id = [], 0, 0
    start = time.perf_counter()
    while pending or engine.has_work():
        while pending and len(engine.scheduler.requests) < args.concurrency:
            engine.add_request(AddRequest(request_id=str(next_id), prompt_token_ids=pending.pop(),
                                          sampling_params=params))
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
            "mean_step_ms": 1e3 * statistics.mean(s for s, _ in steps),
            "gemm_ceiling_gflops": gemm_gflops(getattr(torch, args.dtype)), "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="64,256")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--model", default=None, help="run the whole engine on this CPU model (embedded: SmolLM2)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--token-budget", type=int, default=128)
    parser.add_argument("--json", default=None, help="--model: the result as JSON")
    args = parser.parse_args()
    if args.model is None:
        for batch in (int(b) for b in args.batches.split(",")):
            print(f"batch {batch:4d}, context {args.context}: {step_ms(batch, args.context, args.steps):.2f} ms a step",
                  flush=True)
        return
    result = model_run(args)
    for key, value in result.items():
        print(f"{key:>24}: {value:.1f}" if isinstance(value, float) else f"{key:>24}: {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
