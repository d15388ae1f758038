"""Disaggregated serving on two GPUs: 1 prefill worker (cuda:0) + 1 decode worker (cuda:1).

One script, one device call. In the same run it measures:
- the ceiling: one large device-to-device copy cuda:0 -> cuda:1 (NVLink peer copy), and the
  same copy between two processes through a CUDA IPC mapping (what the workers use);
- Tidal's KV transfer: a Llama-3.1-8B-shaped model with dummy weights (bf16), prompts of
  1k/4k/16k random tokens (no prefix hits) through the real launcher, worker processes and
  router, KV moved by the `cuda_ipc` backend. Per request: TTFT (the first token comes from the
  prefill worker), the decode worker's pull time (GPU-timed), the bytes moved, and the time to
  the second token (the first one the decode worker computes).
Before timing, it checks that disaggregated greedy tokens equal an aggregated run's.
Prints a table; writes JSON to $OUT/disagg_gpu.json when OUT is set.

    python -m benchmarks.disagg_gpu --tokenizer .gpu_assets/tokenizer
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import time
import uuid

import torch

from tidal.deploy.config import parse_deployment
from tidal.deploy.launcher import Launcher
from tidal.perf.ceilings import device_ceilings
from tidal.protocol import AddRequest, SamplingParams
from tidal.router.service import Router
from tidal.transfer.cuda_ipc import peer_copy_ceiling

PARAMS_8B = 8.03e9  # Llama-3.1-8B: 2 x params x tokens FLOPs is the prefill floor

def _deployment(args, roles: list[tuple[str, str]]):
    return parse_deployment({
        "model": args.model, "tokenizer": args.tokenizer,
        "disaggregation": {"local_prefill_threshold": 256},
        "kv_transfer": {"backend": "cuda_ipc", "timeout_s": 60},
        "engine": {"dtype": "bfloat16", "kv_cache_memory_gib": args.kv_gib, "token_budget": args.token_budget,
                   "max_model_len": 32768},
        "workers": [{"role": role, "devices": [device]} for role, device in roles],
    }, "disagg_gpu")


async def _run(router: Router, prompt: list[int], max_tokens: int) -> dict:
    request = AddRequest(request_id=uuid.uuid4().hex, prompt_token_ids=prompt, arrival_time=time.monotonic(),
                         sampling_params=SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    start = time.monotonic()
    times, tokens, transfer_s = [], [], None
    async for delta in router.generate(request):
        if delta.error:
            raise RuntimeError(delta.error)
        if delta.kv_transfer_s is not None:
            transfer_s = delta.kv_transfer_s
        if delta.new_token_ids:
            times.append(time.monotonic() - start)
            tokens += delta.new_token_ids
    return {"tokens": tokens, "ttft_s": times[0], "second_token_s": times[1] if len(times) > 1 else None,
            "kv_transfer_s": transfer_s}


async def _serve(args, roles, work):
    launcher = Launcher(_deployment(args, roles), log_level="WARNING")
    router = Router(launcher.discovery, _deployment(args, roles).router_config())
    try:
        await launcher.start()
        await router.start()
        await router.wait_ready()
        return await work(router)
    finally:
        await router.close()
        await launcher.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="dummy:llama-3.1-8b")
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--sizes", default="1024,4096,16384")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--kv-gib", type=float, default=16.0)
    parser.add_argument("--token-budget", type=int, default=16384)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rng = random.Random(0)
    vocab = 128000
    out: dict = {"device": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(), "sizes": sizes}

    # Ceilings, measured before the workers take the GPUs' memory.
    big = 1 << 30
    out["peer_copy_GBps"] = peer_copy_ceiling(torch.device("cuda:0"), torch.device("cuda:1"), big) / 1e9
    card = device_ceilings()  # cuda:0's HBM copy (read + write) and bf16 matmul rates
    out.update(hbm_copy_GBps=card["copy_GBps_read_plus_write"], bf16_matmul_TFLOPs=card["bf16_matmul_TFLOPs"])
    torch.cuda.empty_cache()

    check_prompt = [rng.randrange(vocab) for _ in range(1500)]

    async def disagg_work(router: Router) -> dict:
        check = await _run(router, check_prompt, 16)
        results = {}
        for n in sizes:
            rows = []
            for i in range(args.repeats + 1):
                prompt = [rng.randrange(vocab) for _ in range(n)]
                row = await _run(router, prompt, 3)
                if i:  # the first of each size warms up
                    rows.append(row)
            results[n] = rows
        return {"check_tokens": check["tokens"], "results": results}

    disagg = asyncio.run(_serve(args, [("prefill", "cuda:0"), ("decode", "cuda:1")], disagg_work))

    async def agg_work(router: Router) -> dict:
        return {"check_tokens": (await _run(router, check_prompt, 16))["tokens"]}

    agg = asyncio.run(_serve(args, [("both", "cuda:1")], agg_work))
    out["greedy_equal"] = disagg["check_tokens"] == agg["check_tokens"]

    block_bytes = 32 * 2 * 8 * 16 * 128 * 2  # Llama-3.1-8B, bf16, block_size 16
    table = []
    for n, rows in disagg["results"].items():
        moved = -(-n // 16) * block_bytes
        transfer = statistics.median(r["kv_transfer_s"] for r in rows)
        ttft = statistics.median(r["ttft_s"] for r in rows)
        second = statistics.median(r["second_token_s"] for r in rows)
        floor_ms = 2 * PARAMS_8B * n / (out["bf16_matmul_TFLOPs"] * 1e12) * 1e3
        table.append({"prompt_tokens": n, "kv_MiB": moved / 2**20, "ttft_ms": ttft * 1e3, "prefill_floor_ms": floor_ms,
                      "kv_transfer_ms": transfer * 1e3, "kv_GBps": moved / transfer / 1e9,
                      "pct_of_ceiling": 100 * moved / transfer / 1e9 / out["peer_copy_GBps"],
                      "second_token_ms": second * 1e3,
                      "transfer_share_pct": 100 * transfer / (ttft + transfer)})
    out["table"] = table
    print(f"device: {out['device']} x{out['gpus']}; peer copy ceiling (1 GiB, cuda:0->cuda:1): "
          f"{out['peer_copy_GBps']:.0f} GB/s; HBM copy {out['hbm_copy_GBps']:.0f} GB/s; bf16 matmul "
          f"{out['bf16_matmul_TFLOPs']:.0f} TFLOP/s; disagg greedy == agg greedy: {out['greedy_equal']}")
    print("| prompt | KV MiB | TTFT ms | prefill floor ms | pull ms | pull GB/s | % ceiling | 2nd token ms "
          "| pull / (TTFT+pull) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['prompt_tokens']} | {r['kv_MiB']:.0f} | {r['ttft_ms']:.1f} | {r['prefill_floor_ms']:.1f} | "
              f"{r['kv_transfer_ms']:.2f} | "
              f"{r['kv_GBps']:.0f} | {r['pct_of_ceiling']:.0f}% | {r['second_token_ms']:.1f} | "
              f"{r['transfer_share_pct']:.1f}% |")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "disagg_gpu.json"), "w") as f:
            json.dump({**out, "raw": {str(k): v for k, v in disagg["results"].items()}}, f, indent=1)


if __name__ == "__main__":
    main()
