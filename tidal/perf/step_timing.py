"""A model runner's forward step timed alone, against the card's ceilings (`tidal.perf.ceilings`).

`tidal.perf.sweep` times whole engine steps (scheduler included) into a profile; this module times
`ModelRunner.forward` on hand-built batches, for `python -m benchmarks.gpu_engine`:
- `decode_batch(B, C)`: B requests at position C-1, each with its own blocks while they fit (else
  blocks are reused across requests: `kv_shared`); `prefill_batch(N)`: one prompt of N tokens;
- `timed_steps(run, batch, iters)`: the median wall time of one step, host inputs to greedy ids
  back on the host (three untimed steps first);
- `step_points(runner, ceilings, ...)`: decode points (B x context, 1k/8k by default) against (weight bytes read
  + KV bytes read) / copy bandwidth, and prefill points against 2 x decoder-layer params x tokens /
  matmul rate (also with attention's FLOPs). The KV cache is filled with random values first.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from tidal.engine.batch import StepBatch
from tidal.models.llama import kv_bytes_per_token

DECODE_CONTEXTS = (1024, 8192)


def i32(x) -> np.ndarray:
    return np.asarray(x, dtype=np.int32)


def decode_batch(batch: int, context: int, block_size: int, num_blocks: int, vocab: int,
                 rng: np.random.Generator) -> tuple[StepBatch, bool]:
    """`batch` requests at position context-1, each with its own blocks while they fit; (batch, shared?)."""
    per_request = math.ceil(context / block_size)
    shared = batch * per_request > num_blocks - 1
    tables = (np.arange(batch * per_request).reshape(batch, per_request) % (num_blocks - 1) + 1).astype(np.int32)
    pos = context - 1
    return StepBatch(
        input_ids=i32(rng.integers(0, vocab, batch)), positions=i32([pos] * batch),
        slot_mapping=tables[:, pos // block_size] * block_size + pos % block_size,
        decode_context_lens=i32([context] * batch), decode_block_tables=tables,
        prefill_cu_query_lens=i32([0]), prefill_context_lens=i32([]),
        prefill_block_tables=np.zeros((0, 0), np.int32), logits_rows=i32(range(batch))), shared


def prefill_batch(tokens: int, block_size: int, vocab: int, rng: np.random.Generator) -> StepBatch:
    """One prompt of `tokens` random ids in blocks 1.. (block 0 stays the null block)."""
    blocks = math.ceil(tokens / block_size)
    return StepBatch(
        input_ids=i32(rng.integers(0, vocab, tokens)), positions=i32(range(tokens)), slot_mapping=i32(range(tokens)),
        decode_context_lens=i32([]), decode_block_tables=np.zeros((0, 0), np.int32),
        prefill_cu_query_lens=i32([0, tokens]), prefill_context_lens=i32([tokens]),
        prefill_block_tables=i32([list(range(1, blocks + 1))]), logits_rows=i32([tokens - 1]))


def timed_steps(run, batch: StepBatch, iters: int) -> float:
    """Median wall time of one step: host inputs -> device -> forward -> greedy ids on the host."""
    for _ in range(3):
        run(batch).argmax(-1).tolist()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        run(batch).argmax(-1).tolist()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def model_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes a decode step reads: every weight but the embedding table, decoder-layer params)."""
    arch = model.arch
    read = sum(p.numel() * p.element_size() for name, p in model.named_parameters()
               if name != "embed_tokens" or arch.tie_word_embeddings)
    layer_params = sum(p.numel() for name, p in model.named_parameters() if name.startswith("layers."))
    return read, layer_params


def step_points(runner, ceilings: dict, decode_grid, prefill_grid, tp: int = 1,
                contexts: tuple[int, ...] = DECODE_CONTEXTS) -> dict:
    """Decode points (each batch of `decode_grid` x `contexts`) and prefill points (each of
    `prefill_grid` that fits the cache), against `ceilings` (`tidal.perf.ceilings.device_ceilings`)."""
    arch = runner.arch
    runner.cache.normal_()  # never time on zeros

    def run(batch: StepBatch):
        if runner.on_step is not None:  # a tensor-parallel leader sends the step to its followers first
            runner.on_step(batch.pack())
        return runner.forward(batch)
    weight_read, layer_params = model_bytes(runner.model)
    weight_read *= tp  # every rank reads its shard: the group reads all of it, in parallel
    bw = ceilings["copy_GBps_read_plus_write"] * 1e9 * tp
    mm = ceilings["bf16_matmul_TFLOPs"] * 1e12 * tp
    kv_token = kv_bytes_per_token(arch, runner.dtype)  # all layers, all kv heads
    rng = np.random.default_rng(0)
    out = {"decode": [], "prefill": [], "weight_bytes_read": weight_read, "num_blocks": runner.num_blocks,
           "tp": tp}
    for context in contexts:
        for batch in decode_grid:
            step, shared = decode_batch(batch, context, runner.block_size, runner.num_blocks, arch.vocab_size, rng)
            seconds = timed_steps(run, step, 30)
            floor = (weight_read + batch * context * kv_token) / bw
            out["decode"].append({"batch": batch, "context": context, "step_ms": seconds * 1e3,
                                  "floor_ms": floor * 1e3, "x_floor": seconds / floor, "kv_shared": shared})
            print(f"decode b={batch} ctx={context}: {seconds * 1e3:.2f} ms (floor {floor * 1e3:.2f})", flush=True)
    for tokens in prefill_grid:
        if math.ceil(tokens / runner.block_size) >= runner.num_blocks:
            continue
        seconds = timed_steps(run, prefill_batch(tokens, runner.block_size, arch.vocab_size, rng), 5)
        linear = 2 * layer_params * tp * tokens
        attention = 4 * arch.num_layers * arch.num_heads * arch.head_dim * tokens * (tokens + 1) / 2
        out["prefill"].append({"tokens": tokens, "ms": seconds * 1e3, "tokens_per_s": tokens / seconds,
                               "floor_ms": linear / mm * 1e3, "mfu_pct": 100 * linear / mm / seconds,
                               "mfu_with_attention_pct": 100 * (linear + attention) / mm / seconds})
        print(f"prefill {tokens}: {seconds * 1e3:.1f} ms, {100 * linear / mm / seconds:.0f}% of matmul", flush=True)
    return out
