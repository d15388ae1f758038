"""GPU smoke run of the plain-torch engine (no Triton, no CUDA graphs yet: that is issue 6).

One script, one device call: measures the card's copy bandwidth and bf16 matmul ceilings, checks
paged attention on the GPU against the dense reference, runs the engine on a Llama-3.1-8B-shaped
dummy model (decode step time vs the bandwidth floor, prefill vs the matmul floor), and serves one
chat request through `tidal serve` on the GPU. Prints a table; writes JSON to $OUT (or --out).

    python benchmarks/gpu_smoke.py --tokenizer .gpu_assets/tokenizer
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tidal import LLM, SamplingParams  # noqa: E402
from tidal.kernels.paged_attention import (AttentionMetadata, PrefillSpan, cache_shape, paged_attention,  # noqa: E402
                                           reference_attention, write_kv)
from tidal.protocol import AddRequest  # noqa: E402


def cuda_time(fn, iters=10, warmup=3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters / 1e3


def ceilings() -> dict:
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_s = cuda_time(lambda: dst.copy_(src))
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    mm_s = cuda_time(lambda: a @ b)
    del src, dst, a, b
    return {"copy_GBps_read_plus_write": 2 * n / copy_s / 1e9, "bf16_matmul_TFLOPs": 2 * 8192 ** 3 / mm_s / 1e12}


def check_attention() -> float:
    """Paged (chunked prefill + decode) vs dense attention on the GPU; returns the max error."""
    torch.manual_seed(0)
    worst = 0.0
    for heads, kv_heads, dim in ((32, 8, 128), (16, 16, 64), (28, 4, 128)):
        length, bs = 300, 16
        q, k, v = (torch.randn(length, h, dim, device="cuda", dtype=torch.bfloat16) for h in (heads, kv_heads, kv_heads))
        ref = reference_attention(q, k, v, dim ** -0.5)
        k_cache = torch.zeros(cache_shape(64, bs, kv_heads, dim), device="cuda", dtype=torch.bfloat16)
        v_cache = torch.zeros_like(k_cache)
        table = torch.randperm(64, device="cuda")[: -(-length // bs)]
        slots = table[torch.arange(length, device="cuda") // bs] * bs + torch.arange(length, device="cuda") % bs
        out = torch.empty_like(q)
        for start, end in ((0, 200), (200, 299)):
            write_kv(k[start:end], v[start:end], k_cache, v_cache, slots[start:end])
            meta = AttentionMetadata(slot_mapping=slots[start:end],
                                     prefills=[PrefillSpan(0, end - start, end, table)])
            out[start:end] = paged_attention(q[start:end], k_cache, v_cache, meta, dim ** -0.5)
        write_kv(k[299:], v[299:], k_cache, v_cache, slots[299:])
        meta = AttentionMetadata(slot_mapping=slots[299:], num_decode_tokens=1, decode_block_tables=table[None],
                                 decode_context_lens=torch.tensor([300], device="cuda"), decode_max_context_len=300)
        out[299:] = paged_attention(q[299:], k_cache, v_cache, meta, dim ** -0.5)
        worst = max(worst, float((out.float() - ref.float()).abs().max()))
    return worst


def engine_run(model: str, tokenizer: str | None, batch: int, input_len: int, output_len: int) -> dict:
    llm = LLM(model, tokenizer=tokenizer, device="cuda", dtype="bfloat16", token_budget=8192,
              kv_cache_memory_bytes=16 << 30, max_num_seqs=256)
    engine = llm.engine
    rng = random.Random(0)
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    results = {}
    for b in (1, batch):
        for i in range(b):
            engine.add_request(AddRequest(request_id=f"{b}-{i}", sampling_params=params,
                                          prompt_token_ids=[rng.randrange(100, 40000) for _ in range(input_len)]))
        steps = []
        while engine.has_work():
            torch.cuda.synchronize()
            t = time.perf_counter()
            deltas = engine.step()
            steps.append((time.perf_counter() - t, len(deltas)))
        first_full = next(i for i, (_, n) in enumerate(steps) if n == b)
        decode = sorted(s for s, n in steps[first_full + 1:] if n == b)
        results[f"batch{b}_decode_step_ms_median"] = 1e3 * decode[len(decode) // 2]
        results[f"batch{b}_prefill_ms"] = 1e3 * sum(s for s, _ in steps[:first_full + 1])
    weights = sum(p.numel() * p.element_size() for p in engine.runner.model.parameters())
    results["weight_GB"] = weights / 1e9
    results["params"] = sum(p.numel() for p in engine.runner.model.parameters())
    del llm, engine
    torch.cuda.empty_cache()
    return results


def serve_once(model: str, tokenizer: str | None) -> dict:
    import httpx

    port = 8431
    cmd = [sys.executable, "-m", "tidal.cli", "serve", model, "--device", "cuda", "--dtype", "bfloat16",
           "--port", str(port), "--kv-cache-memory", "8"]
    if tokenizer:
        cmd += ["--tokenizer", tokenizer]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        name = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"][0]["id"]
        t = time.perf_counter()
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60, json={
            "model": name, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 32,
            "temperature": 0, "ignore_eos": True})
        return {"status": r.status_code, "completion_tokens": r.json()["usage"]["completion_tokens"],
                "latency_s": time.perf_counter() - t}
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="dummy:llama-3.1-8b")
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    args = parser.parse_args()
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    report["ceilings"] = ceilings()
    report["attention_max_abs_err_bf16"] = check_attention()
    report["engine"] = engine_run(args.model, args.tokenizer, args.batch, 1024, 64)
    report["serve"] = serve_once(args.model, args.tokenizer)
    eng, ceil = report["engine"], report["ceilings"]
    floor_ms = eng["weight_GB"] * 1e9 / (ceil["copy_GBps_read_plus_write"] / 2 * 1e9) * 1e3
    prefill_floor_ms = 2 * eng["params"] * 1024 * args.batch / (ceil["bf16_matmul_TFLOPs"] * 1e12) * 1e3
    print(f"| {report['device']} | value |\n|---|---|")
    print(f"| copy bandwidth (read+write) | {ceil['copy_GBps_read_plus_write']:.0f} GB/s |")
    print(f"| bf16 matmul 8192^3 | {ceil['bf16_matmul_TFLOPs']:.0f} TFLOP/s |")
    print(f"| paged attention vs dense, max abs err (bf16) | {report['attention_max_abs_err_bf16']:.3g} |")
    print(f"| decode step, batch 1 (floor {floor_ms:.1f} ms) | {eng['batch1_decode_step_ms_median']:.1f} ms |")
    print(f"| decode step, batch {args.batch} | {eng[f'batch{args.batch}_decode_step_ms_median']:.1f} ms |")
    print(f"| prefill {args.batch}x1024 tokens, budget 8192/step (floor {prefill_floor_ms:.0f} ms) | "
          f"{eng[f'batch{args.batch}_prefill_ms']:.0f} ms |")
    print(f"| tidal serve on GPU, one chat request | HTTP {report['serve']['status']}, "
          f"{report['serve']['completion_tokens']} tokens in {report['serve']['latency_s']:.2f} s |")
    with open(os.path.join(args.out, "gpu_smoke.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
