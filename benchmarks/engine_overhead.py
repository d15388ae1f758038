"""The engine's own cost per step (scheduler, KV blocks, step inputs, outputs) with a runner that
costs nothing: what a GPU step pays on the host besides the model.

    PYTHONPATH=. python benchmarks/engine_overhead.py [--batches 64,256] [--context 1024] [--steps 200]

B requests with C-token prompts decode together (prefix caching on, block size 16); after warm-up
the median wall time of a step over several rounds is printed per batch size.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tidal.config import CacheConfig, EngineConfig, SchedulerConfig  # noqa: E402
from tidal.engine.batch import build_step_batch  # noqa: E402
from tidal.engine.engine import EngineCore, ServedModel  # noqa: E402
from tidal.protocol import AddRequest, SamplingParams  # noqa: E402


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="64,256")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    for batch in (int(b) for b in args.batches.split(",")):
        print(f"batch {batch:4d}, context {args.context}: {step_ms(batch, args.context, args.steps):.2f} ms a step",
              flush=True)


if __name__ == "__main__":
    main()
