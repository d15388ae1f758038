"""GPU microbenchmark of the Triton attention kernels (tidal/kernels/triton_attention.py).

One CUDA device, a Llama-3.1-8B layer (32 heads, 8 kv heads, head_dim 128, block 16, bf16):
1. ceilings: copy bandwidth (read + write) and bf16 matmul throughput of this card;
2. checks: each kernel against its plain-torch reference on realistic shapes (raises on a mismatch);
3. decode at batch 1/16/64/256 x context 1k/8k: GB/s = K+V bytes read / time, with the split count
   of `choose_num_splits` (plus a sweep of split counts at batch 1 and 16);
4. prefill of 2k/8k/32k tokens, alone and after a 4k cached prefix: TFLOP/s = 4 * causal
   (query, key) pairs * H * D / time, and torch SDPA (flash) on the same dense shapes as a peer
   (its output is also compared with the kernel's).
Times are medians of `triton.testing.do_bench` (L2 flushed between runs). Prints a table, writes
JSON to $OUT/attention_gpu.json ($OUT defaults to benchmarks/results/). Any failure is raised,
or, for the SDPA peer, recorded and turned into a non-zero exit after the JSON is written.

    python -m benchmarks.attention_gpu            # on a CUDA machine, well under 2 minutes
    python -m benchmarks.attention_gpu --smoke    # tiny shapes; on a CPU it runs the Triton interpreter
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

SMOKE = "--smoke" in sys.argv
import torch  # noqa: E402  (does not import triton)

if SMOKE and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # must be set before triton is imported

from tidal.kernels import triton_attention as ta  # noqa: E402
from tidal.perf.ceilings import device_ceilings  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE, DTYPE = 32, 8, 128, 16, torch.bfloat16


def timer(device: str):
    """Median seconds of fn(): do_bench on CUDA, wall clock on the CPU (smoke runs only)."""
    if device == "cuda":
        from triton.testing import do_bench
        return lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3

    def wall(fn):
        fn()
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    return wall


def ceilings(device: str, smoke: bool) -> dict:
    if device != "cuda":
        return {}
    return device_ceilings(device, copy_bytes=1 << (20 if smoke else 30), matmul_n=1024 if smoke else 8192,
                           timer=timer(device))


# --- Inputs ------------------------------------------------------------------------------------------

def paged_cache(lengths: list[int], device: str):
    """Random K/V for requests of `lengths` tokens in a cache of exactly their blocks, shuffled (a
    serving cache's blocks are scattered). Returns k_cache, v_cache, block_tables [R, max_blocks] int32."""
    need = [-(-n // BLOCK_SIZE) for n in lengths]
    num_blocks = sum(need)
    shape = (KV_HEADS, num_blocks, BLOCK_SIZE, HEAD_DIM)
    k_cache = torch.randn(shape, dtype=DTYPE, device=device)
    v_cache = torch.randn(shape, dtype=DTYPE, device=device)
    perm = torch.randperm(num_blocks, device=device).to(torch.int32)
    tables = torch.zeros(len(lengths), max(need), dtype=torch.int32, device=device)
    start = 0
    for r, nb in enumerate(need):
        tables[r, :nb] = perm[start:start + nb]
        start += nb
    return k_cache, v_cache, tables


def dense_kv(cache: torch.Tensor, table: torch.Tensor, length: int) -> torch.Tensor:
    """One request's keys [length, kv_heads, D] gathered from the paged cache."""
    pos = torch.arange(length, device=cache.device)
    return cache[:, table.long()[pos // BLOCK_SIZE], pos % BLOCK_SIZE].transpose(0, 1)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    if not out.isfinite().all():
        return float("inf")
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def require(name: str, rel: float, limit: float = 1e-2) -> dict:
    if not rel < limit:
        raise AssertionError(f"{name}: relative error {rel:.3e} >= {limit}")
    return {"check": name, "relative_error": rel}


# --- Checks ----------------------------------------------------------------------------------------

def checks(device: str, smoke: bool) -> list[dict]:
    torch.manual_seed(0)
    long = 300 if smoke else 3000
    results = []
    lengths = [1, 15, 16, 17, long // 10, long, 0]
    k_cache, v_cache, tables = paged_cache([max(n, 1) for n in lengths], device)
    ctx = torch.tensor(lengths, dtype=torch.int32, device=device)
    q = torch.randn(len(lengths), HEADS, HEAD_DIM, device=device).to(DTYPE)
    ref = ta.reference_decode(q, k_cache, v_cache, tables, ctx, HEAD_DIM ** -0.5)
    for splits in (1, 4, 16):
        out = ta.decode_attention(q, k_cache, v_cache, tables, ctx, HEAD_DIM ** -0.5, splits)
        results.append(require(f"decode splits={splits}", relative_error(out, ref)))
        if not (out[-1] == 0).all():
            raise AssertionError("decode: a padding row (context 0) is not zeros")
    chunks = [(0, long // 2), (long // 3, long // 4), (long - 1, 1)]
    lengths = [p + n for p, n in chunks]
    k_cache, v_cache, tables = paged_cache(lengths, device)
    cu = torch.tensor([0] + torch.tensor([n for _, n in chunks]).cumsum(0).tolist(), dtype=torch.int32, device=device)
    ctx = torch.tensor(lengths, dtype=torch.int32, device=device)
    q = torch.randn(int(cu[-1]), HEADS, HEAD_DIM, device=device).to(DTYPE)
    out = ta.prefill_attention(q, k_cache, v_cache, cu, ctx, tables, max(n for _, n in chunks), HEAD_DIM ** -0.5)
    ref = ta.reference_prefill(q, k_cache, v_cache, cu, ctx, tables, HEAD_DIM ** -0.5)
    results.append(require("prefill with cached prefixes", relative_error(out, ref)))
    k, v = (torch.randn(64, KV_HEADS, HEAD_DIM, device=device).to(DTYPE) for _ in range(2))
    slots = torch.randperm(k_cache.shape[1] * BLOCK_SIZE, device=device)[:64]
    slots[::7] = -1
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    ta.write_kv(k, v, k_cache, v_cache, slots)
    ta.reference_write_kv(k, v, expected_k, expected_v, slots)
    if not (torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)):
        raise AssertionError("write_kv differs from its reference")
    results.append({"check": "write_kv", "relative_error": 0.0})
    return results


# --- Decode ----------------------------------------------------------------------------------------

def decode_case(bench, device: str, batch: int, context: int, splits_list: list[int], chosen: int) -> list[dict]:
    """Decode of `batch` requests of `context` tokens each, timed per split count."""
    k_cache, v_cache, tables = paged_cache([context] * batch, device)
    ctx = torch.full((batch,), context, dtype=torch.int32, device=device)
    q = torch.randn(batch, HEADS, HEAD_DIM, device=device).to(DTYPE)
    out = torch.empty_like(q)
    kv_bytes = 2 * batch * context * KV_HEADS * HEAD_DIM * k_cache.element_size()
    rows = []
    for splits in splits_list:
        seconds = bench(lambda: ta.decode_attention(q, k_cache, v_cache, tables, ctx, HEAD_DIM ** -0.5, splits,
                                                    out=out))
        rows.append({"batch": batch, "context": context, "num_splits": splits, "chosen": splits == chosen,
                     "us": seconds * 1e6, "GBps": kv_bytes / seconds / 1e9})
    return rows


def decode_rows(device: str, smoke: bool, num_sms: int) -> list[dict]:
    bench = timer(device)
    batches, contexts = ((1, 3), (40, 300)) if smoke else ((1, 16, 64, 256), (1024, 8192))
    rows = []
    for batch in batches:
        for context in contexts:
            chosen = ta.choose_num_splits(batch, KV_HEADS, context, num_sms)
            # At small batches also sweep the split count, to judge the heuristic.
            sweep = [] if smoke or batch > 16 else [s for s in (1, 4, 8, 16, 32) if s != chosen]
            rows += decode_case(bench, device, batch, context, [chosen] + sweep, chosen)
    return rows


# --- Prefill ---------------------------------------------------------------------------------------

def sdpa_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: int):
    """torch SDPA on the flash backend, [L, H, D] queries over [prefix + L, kvH, D] keys, causal
    aligned bottom-right (the queries are the last L positions). Returns a closure."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    groups = q.shape[1] // k.shape[1]
    qd = q.transpose(0, 1)[None]  # [1, H, L, D]
    kd, vd = (t.repeat_interleave(groups, dim=1).transpose(0, 1)[None] for t in (k, v))
    mask = causal_lower_right(q.shape[0], k.shape[0]) if prefix else None

    def run():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            if mask is None:
                out = torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, is_causal=True)
            else:
                out = torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask)
        return out[0].transpose(0, 1)
    return run


def prefill_case(bench, device: str, length: int, prefix: int, errors: list[str]) -> dict:
    """One sequence: a chunk of `length` tokens after `prefix` cached ones, vs SDPA on the same keys."""
    total = prefix + length
    k_cache, v_cache, tables = paged_cache([total], device)
    q = torch.randn(length, HEADS, HEAD_DIM, device=device).to(DTYPE)
    cu = torch.tensor([0, length], dtype=torch.int32, device=device)
    ctx = torch.tensor([total], dtype=torch.int32, device=device)
    out = torch.empty_like(q)

    def triton_run():
        return ta.prefill_attention(q, k_cache, v_cache, cu, ctx, tables, length, HEAD_DIM ** -0.5, out=out)
    flops = 4 * (length * prefix + length * (length + 1) // 2) * HEADS * HEAD_DIM  # causal pairs only
    seconds = bench(triton_run)
    row = {"tokens": length, "prefix": prefix, "triton_ms": seconds * 1e3, "triton_TFLOPs": flops / seconds / 1e12}
    if device != "cuda":
        return row
    try:
        k, v = dense_kv(k_cache, tables[0], total), dense_kv(v_cache, tables[0], total)
        peer = sdpa_flash(q, k, v, prefix)
        peer_s = bench(peer)
        row.update(sdpa_ms=peer_s * 1e3, sdpa_TFLOPs=flops / peer_s / 1e12,
                   rel_err_vs_sdpa=relative_error(triton_run(), peer()))
        require(f"prefill {length} after {prefix} vs SDPA", row["rel_err_vs_sdpa"])
    except Exception as exc:  # the peer or the comparison failed: recorded here, the exit code says so at the end
        row["sdpa_error"] = f"{type(exc).__name__}: {exc}"
        errors.append(f"prefill {length}+{prefix}: {row['sdpa_error']}")
    return row


def prefill_rows(device: str, smoke: bool, errors: list[str]) -> list[dict]:
    bench = timer(device)
    lengths, prefixes = ((50, 140), (0, 30)) if smoke else ((2048, 8192, 32768), (0, 4096))
    return [prefill_case(bench, device, length, prefix, errors) for length in lengths for prefix in prefixes]


# --- Report ----------------------------------------------------------------------------------------

def print_tables(result: dict) -> None:
    print(f"device: {result['device']}  ceilings: {json.dumps(result['ceilings'])}")
    for c in result["checks"]:
        print(f"check {c['check']:<32} rel err {c['relative_error']:.2e}")
    copy = result["ceilings"].get("copy_GBps_read_plus_write")
    print(f"\n{'batch':>6} {'context':>8} {'splits':>7} {'us':>9} {'GB/s':>8} {'of copy':>8}")
    for r in result["decode"]:
        share = f"{r['GBps'] / copy:.0%}" if copy else "-"
        mark = "*" if r["chosen"] else " "
        print(f"{r['batch']:>6} {r['context']:>8} {r['num_splits']:>6}{mark} {r['us']:>9.1f} {r['GBps']:>8.0f}"
              f" {share:>8}")
    print("(* = choose_num_splits)")
    print(f"\n{'tokens':>7} {'prefix':>7} {'ms':>8} {'TFLOP/s':>8} {'sdpa ms':>8} {'sdpa TF/s':>10} {'rel err':>8}")
    for r in result["prefill"]:
        peer = (f"{r['sdpa_ms']:>8.2f} {r['sdpa_TFLOPs']:>10.0f} {r['rel_err_vs_sdpa']:>8.1e}" if "sdpa_ms" in r
                else f"  {r.get('sdpa_error', '-')}")
        print(f"{r['tokens']:>7} {r['prefix']:>7} {r['triton_ms']:>8.2f} {r['triton_TFLOPs']:>8.0f} {peer}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (a CPU runs the Triton interpreter)")
    parser.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results/", help="output folder")
    args = parser.parse_args()
    if not ta.HAS_TRITON:
        raise SystemExit("triton is not installed")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        if not args.smoke:
            raise SystemExit("no CUDA device: only --smoke runs on the CPU")
        from tidal.kernels import _triton_interp_compat
        _triton_interp_compat.apply()
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count if device == "cuda" else 132
    started = time.time()
    errors: list[str] = []
    result = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu (triton interpreter)",
              "num_sms": num_sms, "shape": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
                                            "block_size": BLOCK_SIZE, "dtype": str(DTYPE)},
              "smoke": args.smoke, "ceilings": ceilings(device, args.smoke), "checks": checks(device, args.smoke)}
    result["decode"] = decode_rows(device, args.smoke, num_sms)
    result["prefill"] = prefill_rows(device, args.smoke, errors)
    result["errors"] = errors
    result["seconds"] = time.time() - started
    print_tables(result)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "attention_gpu.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nwrote {path} ({result['seconds']:.0f} s)")
    if errors:
        raise SystemExit("errors: " + "; ".join(errors))


if __name__ == "__main__":
    main()
