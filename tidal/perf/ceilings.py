"""The hardware's ceilings, measured in the run that quotes them: copy bandwidth and matmul rate.

A time means little without what the device could do at best, and a card's figures drift with its
clocks, its temperature and its neighbours, so every benchmark measures them itself:
- `device_ceilings`: one buffer copied into another (bytes read + written per second) and one
  square bf16 matmul (2 n^3 FLOPs); on CUDA timed with CUDA events, or with the caller's timer
  (Triton's `do_bench`); on a CPU with the wall clock;
- `gemm_gflops`: a CPU's rate at one linear layer's shape (what a small model's MLP runs at);
- `cards_and_ceilings`: the cards' names and cuda:0's ceilings from a child process, so no CUDA
  context or cached memory stays in the caller (a server it starts next gets the whole card).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable

import torch

Timer = Callable[[Callable[[], object]], float]
"""Seconds one call of a function takes."""


def cuda_timer(iters: int = 10, warmup: int = 3) -> Timer:
    """Mean seconds of `iters` back-to-back calls between two CUDA events, after `warmup` calls."""
    def seconds(fn: Callable[[], object]) -> float:
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
    return seconds


def wall_timer(iters: int = 3, warmup: int = 1) -> Timer:
    """Mean wall seconds of `iters` calls after `warmup` calls (a CPU device)."""
    def seconds(fn: Callable[[], object]) -> float:
        for _ in range(warmup):
            fn()
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - start) / iters
    return seconds


def device_ceilings(device: str | torch.device = "cuda", copy_bytes: int = 1 << 30, matmul_n: int = 8192,
                    timer: Timer | None = None) -> dict[str, float]:
    """The device's copy bandwidth (GB/s read + written) and bf16 matmul rate (TFLOP/s)."""
    device = torch.device(device)
    timer = timer or (cuda_timer() if device.type == "cuda" else wall_timer())
    src = torch.empty(copy_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_s = timer(lambda: dst.copy_(src))
    a, b = (torch.randn(matmul_n, matmul_n, dtype=torch.bfloat16, device=device) for _ in range(2))
    matmul_s = timer(lambda: a @ b)
    return {"copy_GBps_read_plus_write": 2 * copy_bytes / copy_s / 1e9,
            "bf16_matmul_TFLOPs": 2 * matmul_n ** 3 / matmul_s / 1e12}


def gemm_gflops(dtype: torch.dtype, m: int = 256, k: int = 576, n: int = 1536, iters: int = 100) -> float:
    """GFLOP/s of one [m, k] x [k, n] matmul on the CPU (default: SmolLM2-135M's MLP at 256 tokens)."""
    a, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
    seconds = wall_timer(iters=iters, warmup=5)(lambda: torch.nn.functional.linear(a, w))
    return 2 * m * k * n / seconds / 1e9


_CHILD = ("import json, torch; from tidal.perf.ceilings import device_ceilings; "
          "names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]; "
          "print(json.dumps({'cards': names, 'torch': torch.__version__, 'ceilings_cuda0': device_ceilings()}))")


def cards_and_ceilings(env: dict[str, str] | None = None, cwd: str | None = None, timeout_s: float = 180) -> dict:
    """{"cards", "torch", "ceilings_cuda0"} measured in a child process, or {"error": its stderr}."""
    out = subprocess.run([sys.executable, "-c", _CHILD], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=timeout_s)
    if out.returncode != 0:
        return {"error": out.stderr[-1000:]}
    return json.loads(out.stdout.strip().splitlines()[-1])
