"""`tidal.perf.step_timing` on the CPU: the hand-built batches, and the step points against made-up
ceilings (`python -m benchmarks.gpu_engine` runs them on the GPU)."""

from __future__ import annotations

import numpy as np

from tidal import LLM
from tidal.perf.step_timing import decode_batch, prefill_batch, step_points


def test_decode_batch_shares_blocks_only_when_they_do_not_fit():
    rng = np.random.default_rng(0)
    own, shared = decode_batch(4, 64, block_size=16, num_blocks=32, vocab=100, rng=rng)
    assert not shared and own.num_decodes == 4 and own.decode_block_tables.shape == (4, 4)
    assert len(set(own.decode_block_tables.ravel())) == 16 and 0 not in own.decode_block_tables
    assert list(own.slot_mapping) == [int(row[3]) * 16 + 15 for row in own.decode_block_tables]
    _, shared = decode_batch(8, 64, block_size=16, num_blocks=32, vocab=100, rng=rng)
    assert shared
    prefill = prefill_batch(40, block_size=16, vocab=100, rng=rng)
    assert prefill.num_prefills == 1 and prefill.num_tokens == 40 and list(prefill.prefill_block_tables[0]) == [1, 2, 3]


def test_step_points_on_the_cpu():
    with LLM("dummy:tiny-llama", dtype="float32", num_kv_blocks=64) as llm:
        ceilings = {"copy_GBps_read_plus_write": 10.0, "bf16_matmul_TFLOPs": 0.1}
        out = step_points(llm.engine.runner, ceilings, decode_grid=[1, 2], prefill_grid=[32, 10**6],
                          contexts=(64, 512))
    assert [(d["batch"], d["context"]) for d in out["decode"]] == [(1, 64), (2, 64), (1, 512), (2, 512)]
    assert all(d["step_ms"] > 0 and d["floor_ms"] > 0 and d["x_floor"] > 0 for d in out["decode"])
    assert [p["tokens"] for p in out["prefill"]] == [32]  # a prompt the cache can't hold is skipped
    assert out["weight_bytes_read"] > 0 and out["num_blocks"] == 64 and out["tp"] == 1
