"""KV pull bandwidth between two GPUs of one host (cuda_ipc), against the peer-copy ceiling.

A source process on --src-device allocates a Llama-3.1-8B-shaped KV cache (32 layers, 8 KV heads,
head_dim 128, bf16, block_size 16) with the chosen backend, fills it with a pattern, publishes its
`KVSourceInfo` (msgspec bytes over a pipe) and waits. This process, on --dst-device, pulls 1k, 4k
and 16k tokens' worth of blocks, randomly scattered in both pools as a real block pool leaves them,
checks every pulled element against the pattern, and times each size: wall time from
`start_pull` until `done()`, median of --repeats pulls after --warmup. The ceiling is one
contiguous copy of the same byte count: device to device within this process
(`peer_copy_ceiling`), and from the source's cache through the IPC mapping (cuda_ipc only).

    python -m benchmarks.kv_transfer_gpu                          # cuda:0 -> cuda:1, cuda_ipc
    python -m benchmarks.kv_transfer_gpu --chunk-layers 8         # tune the pipeline
    python -m benchmarks.kv_transfer_gpu --device cpu --backend shm --layers 4 --num-blocks 512 \\
        --tokens 256,1024,4096                                    # CPU smoke test (two processes)

Prints a table; with OUT set (or --out), writes OUT/kv_transfer.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import statistics
import subprocess
import time

import msgspec
import torch

from tidal.protocol import KVLayout, KVSourceInfo
from tidal.transfer import KVTransferBackend, KVTransferConfig, create_kv_transfer
from tidal.transfer.base import block_rows, layout_bytes_per_block

_FILL_BLOCKS = 1024  # blocks per pattern slice when filling (bounds the int64 temporaries)


def pattern(layout: KVLayout, first_row: int, num_rows: int, block_ids: torch.Tensor) -> torch.Tensor:
    """Expected contents of rows [first_row, first_row + num_rows) of `block_rows(cache)` at
    `block_ids`: [num_rows, n, block_size*head_dim] in the layout's dtype. Any device computes the
    same bits (integer arithmetic, then one rounding)."""
    device = block_ids.device
    rows = torch.arange(first_row, first_row + num_rows, device=device).view(-1, 1, 1)
    cols = torch.arange(layout.block_size * layout.head_dim, device=device).view(1, 1, -1)
    values = (rows * 7919 + block_ids.view(1, -1, 1) * 104729 + cols * 31) % 65521 - 32760
    return values.to(torch.float32).to(getattr(torch, layout.dtype))


def fill(backend: KVTransferBackend) -> None:
    layout, rows = backend.layout, block_rows(backend.cache)  # [L*2H, num_blocks, bs*D]
    rows_per_layer = 2 * layout.num_kv_heads
    for first_row in range(0, rows.shape[0], rows_per_layer):
        for first_block in range(0, layout.num_blocks, _FILL_BLOCKS):
            blocks = torch.arange(first_block, min(first_block + _FILL_BLOCKS, layout.num_blocks),
                                  device=backend.device)
            values = pattern(layout, first_row, rows_per_layer, blocks)
            rows[first_row:first_row + rows_per_layer, blocks] = values


def check(backend: KVTransferBackend, src_ids: list[int], dst_ids: list[int]) -> None:
    """Every pulled element equals the source pattern (one layer at a time)."""
    layout, rows = backend.layout, block_rows(backend.cache)
    rows_per_layer = 2 * layout.num_kv_heads
    src_idx = torch.tensor(src_ids, device=backend.device)
    dst_idx = torch.tensor(dst_ids, device=backend.device)
    for first_row in range(0, rows.shape[0], rows_per_layer):
        got = rows[first_row:first_row + rows_per_layer].index_select(1, dst_idx)
        if not torch.equal(got, pattern(layout, first_row, rows_per_layer, src_idx)):
            raise AssertionError(f"pulled KV differs from the source in rows {first_row}..")


def source_main(layout_msg: bytes, device: str, backend: str, conn) -> None:
    """Child: allocate and fill the source cache, publish its KVSourceInfo, hold it until told."""
    layout = msgspec.msgpack.decode(layout_msg, type=KVLayout)
    config = KVTransferConfig(backend=backend)
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(torch.device(device))
    source = create_kv_transfer(layout, torch.device(device), "bench-prefill", config)
    fill(source)
    if source.device.type == "cuda":
        torch.cuda.synchronize(source.device)
    conn.send_bytes(msgspec.msgpack.encode(source.source_info()))
    try:
        conn.recv_bytes()
    except EOFError:
        pass
    source.close()


def sync(*devices: torch.device) -> None:
    for device in devices:
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def timed_pull(backend: KVTransferBackend, info: KVSourceInfo, src_ids: list[int],
               dst_ids: list[int]) -> tuple[float, float]:
    """(seconds until done, seconds spent in start_pull). CUDA pulls are polled in a busy loop
    (a sleep would round sub-millisecond pulls up); CPU pulls run on a thread that needs the core."""
    started = time.perf_counter()
    transfer = backend.start_pull(info, src_ids, dst_ids)
    launched = time.perf_counter()
    if backend.device.type == "cuda":
        while not transfer.done():
            pass
        transfer.result()
    else:
        transfer.wait()
    return time.perf_counter() - started, launched - started


def copy_ceiling_s(src: torch.Tensor, dst: torch.Tensor, repeats: int) -> float:
    """Median seconds of one contiguous copy src -> dst."""
    if src.is_cuda:
        from tidal.transfer.cuda_ipc import time_copy
        return time_copy(dst, src, repeats=repeats)
    dst.copy_(src)
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        dst.copy_(src)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def measure(args, layout: KVLayout, dst: KVTransferBackend, info: KVSourceInfo,
            src_device: torch.device) -> list[dict]:
    rng = random.Random(args.seed)
    dtype = getattr(torch, layout.dtype)
    results = []
    for tokens in args.tokens:
        num_blocks = -(-tokens // layout.block_size)
        num_bytes = num_blocks * layout_bytes_per_block(layout)
        seconds, launch_seconds = [], []
        for i in range(args.warmup + args.repeats):
            src_ids = rng.sample(range(info.layout.num_blocks), num_blocks)
            dst_ids = rng.sample(range(layout.num_blocks), num_blocks)
            sync(src_device, dst.device)
            pull_s, launch_s = timed_pull(dst, info, src_ids, dst_ids)
            check(dst, src_ids, dst_ids)
            if i >= args.warmup:
                seconds.append(pull_s)
                launch_seconds.append(launch_s)
        numel = num_bytes // dtype.itemsize
        flat_src = torch.empty(numel, dtype=dtype, device=src_device)
        flat_dst = torch.empty(numel, dtype=dtype, device=dst.device)
        ceiling_s = copy_ceiling_s(flat_src, flat_dst, args.repeats)
        del flat_src
        ipc_ceiling_s = None
        if info.backend == "cuda_ipc":
            peer = dst.peer_cache(info).view(-1)[:numel]  # the source's memory, through the IPC mapping
            ipc_ceiling_s = copy_ceiling_s(peer, flat_dst, args.repeats)
        del flat_dst
        pull_s = statistics.median(seconds)
        results.append({
            "tokens": tokens, "blocks": num_blocks, "bytes": num_bytes, "pull_ms": pull_s * 1e3,
            "pull_ms_all": [s * 1e3 for s in seconds], "launch_ms": statistics.median(launch_seconds) * 1e3,
            "pull_GBps": num_bytes / pull_s / 1e9, "ceiling_GBps": num_bytes / ceiling_s / 1e9,
            "ipc_ceiling_GBps": num_bytes / ipc_ceiling_s / 1e9 if ipc_ceiling_s else None,
            "pct_of_ceiling": 100 * ceiling_s / pull_s, "verified": True,
        })
    return results


def print_table(results: list[dict]) -> None:
    print(f"{'tokens':>7} {'MiB':>8} {'pull ms':>9} {'launch ms':>9} {'pull GB/s':>9} "
          f"{'ceiling GB/s':>12} {'IPC ceil GB/s':>13} {'% ceiling':>9}")
    for r in results:
        ipc = f"{r['ipc_ceiling_GBps']:13.1f}" if r["ipc_ceiling_GBps"] else f"{'-':>13}"
        print(f"{r['tokens']:>7} {r['bytes'] / 2**20:8.1f} {r['pull_ms']:9.3f} {r['launch_ms']:9.3f} "
              f"{r['pull_GBps']:9.1f} {r['ceiling_GBps']:12.1f} {ipc} {r['pct_of_ceiling']:8.0f}%")


def environment(src_device: torch.device, dst_device: torch.device) -> dict:
    env = {"torch": torch.__version__, "src_device": str(src_device), "dst_device": str(dst_device)}
    if dst_device.type == "cuda":
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        try:
            topo = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True, timeout=30)
            env["nvidia_smi_topo"] = topo.stdout
        except (OSError, subprocess.TimeoutExpired):
            pass
    return env


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--backend", default=None, help="default: cuda_ipc on cuda, shm on cpu")
    parser.add_argument("--src-device", default=None, help="default: cuda:0 (or cpu)")
    parser.add_argument("--dst-device", default=None, help="default: cuda:1 (or cpu)")
    parser.add_argument("--tokens", default="1024,4096,16384", help="pull sizes, comma-separated")
    parser.add_argument("--num-blocks", type=int, default=4096, help="blocks in each worker's pool")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--chunk-layers", type=int, default=KVTransferConfig.chunk_layers)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.environ.get("OUT"),
                        help="folder for kv_transfer.json (default: $OUT)")
    args = parser.parse_args()
    args.tokens = [int(t) for t in args.tokens.split(",")]
    cuda = args.device == "cuda"
    args.backend = args.backend or ("cuda_ipc" if cuda else "shm")
    args.src_device = torch.device(args.src_device or ("cuda:0" if cuda else "cpu"))
    args.dst_device = torch.device(args.dst_device or ("cuda:1" if cuda else "cpu"))
    needed_gpus = 1 + max(d.index or 0 for d in (args.src_device, args.dst_device)) if cuda else 0
    if cuda and torch.cuda.device_count() < needed_gpus:
        parser.error(f"needs {needed_gpus} CUDA devices, found {torch.cuda.device_count()} "
                     "(one GPU: --dst-device cuda:0; no GPU: --device cpu --backend shm)")
    if max(args.tokens) > args.num_blocks * args.block_size:
        parser.error("--num-blocks too small for the largest pull")
    return args


def main() -> None:
    args = parse_args()
    layout = KVLayout(num_layers=args.layers, num_kv_heads=args.kv_heads, num_blocks=args.num_blocks,
                      block_size=args.block_size, head_dim=args.head_dim, dtype=args.dtype)
    config = KVTransferConfig(backend=args.backend, chunk_layers=args.chunk_layers, timeout_s=60.0)
    if args.dst_device.type == "cuda":
        torch.cuda.set_device(args.dst_device)
    ctx = multiprocessing.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    child = ctx.Process(target=source_main, daemon=True,
                        args=(msgspec.msgpack.encode(layout), str(args.src_device), args.backend, child_conn))
    child.start()
    child_conn.close()
    dst = None
    try:
        if not conn.poll(600):
            raise TimeoutError("the source process did not publish its KV cache")
        info = msgspec.msgpack.decode(conn.recv_bytes(), type=KVSourceInfo)
        dst = create_kv_transfer(layout, args.dst_device, "bench-decode", config)
        results = measure(args, layout, dst, info, args.src_device)
    finally:
        if dst is not None:
            dst.close()  # unmap the source's memory before it exits
        if child.is_alive():
            conn.send_bytes(b"stop")
        child.join(60)
    where = torch.cuda.get_device_name(args.dst_device) if args.dst_device.type == "cuda" else "cpu"
    chunks = ""
    if args.backend == "cuda_ipc":
        chunks = f", chunk_layers {args.chunk_layers or 'auto (~32 MiB a chunk)'}"
    print(f"backend {args.backend} on {where}, {args.src_device} -> {args.dst_device}{chunks}, "
          f"{layout_bytes_per_block(layout) / 2**10:.0f} KiB per block of {args.block_size} tokens")
    print_table(results)
    if args.out:
        report = {"backend": args.backend, "chunk_layers": args.chunk_layers,
                  "layout": msgspec.to_builtins(layout), "repeats": args.repeats, "warmup": args.warmup,
                  "environment": environment(args.src_device, args.dst_device), "results": results}
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "kv_transfer.json"), "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
