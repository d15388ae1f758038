"""Triton attention kernels (tidal/kernels/triton_attention.py) vs their plain-torch references.

- `gpu` tests: the full grid (head dims, GQA ratios, block sizes, dtypes, ragged lengths up to
  2000, split-KV, padding rows, CUDA-graph capture, a cache past 2^31 elements) on CUDA.
- `test_interp_*`: tiny shapes on the CPU under the Triton interpreter. They run only where
  TRITON_INTERPRET=1 was set before triton was imported, so `test_kernels_under_triton_interpreter`
  runs them in a subprocess with that environment.
- `test_kernels_compile_for_hopper`: compiles every launch for sm_90 without a GPU (the wheel's
  ptxas), catching what the interpreter cannot: compiler errors, register spills, unpipelined loads.
- The loop references agree with the dense `reference_attention` (plain CPU).
- gpt-oss's per-layer options, a sliding window and per-head sinks, through the same checks
  (decode with and without splits, prefill and chunked prefill after a cached prefix).

Every check poisons what a kernel must not read (unwritten cache slots and unused blocks hold NaN)
and what it must write (outputs start as NaN, and q/out are strided views).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from tidal.kernels import paged_attention as pa
from tidal.kernels import triton_attention as ta

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if INTERPRET and ta.HAS_TRITON:
    from tidal.kernels import _triton_interp_compat

    _triton_interp_compat.apply()

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
# (‖out - ref‖ / ‖ref‖, max |out - ref|) against the fp32 reference; outputs are O(1).
TOLERANCES = {BF16: (1e-2, 3e-2), FP16: (2e-3, 4e-3), FP32: (1e-5, 1e-4)}
KV_HEADS = 2
needs_interpreter = pytest.mark.skipif(
    not (INTERPRET and ta.HAS_TRITON), reason="runs under TRITON_INTERPRET=1 (test_kernels_under_triton_interpreter)")


# --- Inputs ------------------------------------------------------------------------------------------

def _num_blocks(lengths: list[int], block_size: int) -> list[int]:
    return [-(-n // block_size) for n in lengths]


def _poisoned_cache(lengths, block_size, head_dim, dtype, device, kv_heads=KV_HEADS):
    """One layer's K and V cut from a [layers, 2, ...] tensor as the runner allocates them, all NaN
    (never written), with room for `lengths` plus spare blocks."""
    num_blocks = sum(_num_blocks(lengths, block_size)) + 3
    full = torch.full((2, 2, kv_heads, num_blocks, block_size, head_dim), float("nan"), dtype=dtype, device=device)
    return full[1, 0], full[1, 1]


def _fill(k_cache, v_cache, lengths):
    """Random K/V for each request at random distinct blocks. Returns the block tables
    [R, max_blocks] int32 (unused entries name a never-written block) and the K/V per request."""
    kv_heads, num_blocks, block_size, head_dim = k_cache.shape
    device = k_cache.device
    perm = torch.randperm(num_blocks).tolist()
    poison_block = perm.pop()
    need = _num_blocks(lengths, block_size)
    tables = torch.full((len(lengths), max(need + [1])), poison_block, dtype=torch.int32)
    kvs = []
    for r, (n, nb) in enumerate(zip(lengths, need)):
        tables[r, :nb] = torch.tensor([perm.pop() for _ in range(nb)], dtype=torch.int32)
        pos = torch.arange(n)
        slots = (tables[r, pos // block_size].long() * block_size + pos % block_size).to(device)
        k, v = (torch.randn(n, kv_heads, head_dim, device=device).to(k_cache.dtype) for _ in range(2))
        pa.write_kv(k, v, k_cache, v_cache, slots)
        kvs.append((k, v))
    return tables.to(device), kvs


def _strided(rows: int, heads: int, head_dim: int, dtype, device, fill=None) -> torch.Tensor:
    """[rows, heads, head_dim] as a view with a larger row stride, like q sliced from a fused qkv."""
    base = torch.randn(rows, heads + 3, head_dim, device=device).to(dtype) if fill is None else \
        torch.full((rows, heads + 3, head_dim), fill, dtype=dtype, device=device)
    return base[:, 1:heads + 1]


def _assert_close(out: torch.Tensor, ref: torch.Tensor, dtype) -> None:
    assert out.isfinite().all(), "some outputs are unwritten (NaN) or not finite"
    rel_tol, abs_tol = TOLERANCES[dtype]
    err = out.float() - ref
    rel = float(err.norm() / ref.norm().clamp_min(1e-6))
    worst = float(err.abs().max())
    assert rel < rel_tol and worst < abs_tol, f"relative error {rel:.2e}, max abs error {worst:.2e}"


# --- Checks shared by the GPU and interpreter tests ------------------------------------------------

def check_write_kv(device, dtype, head_dim, kv_heads, block_size, num_tokens=40):
    torch.manual_seed(0)
    k_cache, v_cache = _poisoned_cache([num_tokens * 2], block_size, head_dim, dtype, device, kv_heads)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    slot_count = k_cache.shape[1] * block_size
    slots = torch.randperm(slot_count, device=device)[:num_tokens]
    slots[::5] = -1  # padding rows of a CUDA-graph batch
    k, v = (_strided(num_tokens, kv_heads, head_dim, dtype, device) for _ in range(2))
    ta.write_kv(k, v, k_cache, v_cache, slots)
    ta.reference_write_kv(k, v, expected_k, expected_v, slots)
    bits = torch.int32 if dtype == FP32 else torch.int16  # bitwise equal, NaN (untouched slots) included
    assert torch.equal(k_cache.view(bits), expected_k.view(bits))
    assert torch.equal(v_cache.view(bits), expected_v.view(bits))


def _sinks(with_sinks: bool, num_heads: int, device) -> torch.Tensor | None:
    """Sink logits of the size of the scores, so they take a real share of the softmax."""
    return 2 * torch.randn(num_heads, device=device) if with_sinks else None


def check_decode(device, dtype, head_dim, groups, block_size, lengths, num_splits, table_dtype=torch.int32,
                 window=None, with_sinks=False):
    torch.manual_seed(1)
    num_heads = KV_HEADS * groups
    k_cache, v_cache = _poisoned_cache(lengths, block_size, head_dim, dtype, device)
    tables, _ = _fill(k_cache, v_cache, lengths)
    tables = tables.to(table_dtype)
    context_lens = torch.tensor(lengths, dtype=torch.int32, device=device)
    q = _strided(len(lengths), num_heads, head_dim, dtype, device)
    out = _strided(len(lengths), num_heads, head_dim, dtype, device, fill=float("nan"))
    scale = head_dim ** -0.5
    options = {"window": window, "sinks": _sinks(with_sinks, num_heads, device)}
    result = ta.decode_attention(q, k_cache, v_cache, tables, context_lens, scale, num_splits, out=out, **options)
    assert result is out
    ref = ta.reference_decode(q, k_cache, v_cache, tables, context_lens, scale, **options)
    _assert_close(out, ref, dtype)
    assert (out[context_lens == 0] == 0).all(), "padding rows must be zeros"
    fresh = ta.decode_attention(q, k_cache, v_cache, tables, context_lens, scale, num_splits, **options)
    assert torch.equal(fresh, out)


def check_prefill(device, dtype, head_dim, groups, block_size, chunks, window=None, with_sinks=False):
    """chunks: [(cached prefix, chunk length)] per request; the chunk's K/V are already cached."""
    torch.manual_seed(2)
    num_heads = KV_HEADS * groups
    lengths = [prefix + n for prefix, n in chunks]
    k_cache, v_cache = _poisoned_cache(lengths, block_size, head_dim, dtype, device)
    tables, _ = _fill(k_cache, v_cache, lengths)
    query_lens = [n for _, n in chunks]
    cu = torch.tensor([0] + torch.tensor(query_lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    context_lens = torch.tensor(lengths, dtype=torch.int32, device=device)
    num_tokens = sum(query_lens)
    q = _strided(num_tokens, num_heads, head_dim, dtype, device)
    out = _strided(num_tokens, num_heads, head_dim, dtype, device, fill=float("nan"))
    scale = head_dim ** -0.5
    options = {"window": window, "sinks": _sinks(with_sinks, num_heads, device)}
    result = ta.prefill_attention(q, k_cache, v_cache, cu, context_lens, tables, max(query_lens), scale, out=out,
                                  **options)
    assert result is out
    ref = ta.reference_prefill(q, k_cache, v_cache, cu, context_lens, tables, scale, **options)
    _assert_close(out, ref, dtype)


def decode_lengths(block_size: int, long: int) -> list[int]:
    return [1, block_size - 1, 0, block_size, block_size + 1, long, 3 * long // 20, 0]


def prefill_chunks(block_size: int, long: int) -> list[tuple[int, int]]:
    return [(0, 1), (0, block_size - 1), (0, block_size + 1), (block_size, block_size), (37, long // 3),
            (long // 2, long // 2), (long - 1, 1), (0, 0), (0, long)]


# --- GPU ---------------------------------------------------------------------------------------------

GPU_GRID = [pytest.param(d, g, bs, dt, id=f"D{d}-G{g}-bs{bs}-{str(dt)[6:]}")
            for d in (64, 128) for g in (1, 4, 8) for bs in (16, 32) for dt in (BF16, FP16)]
GPU_ODD = [pytest.param(128, 4, 8, BF16, id="bs8"), pytest.param(128, 4, 64, BF16, id="bs64"),
           pytest.param(32, 2, 16, BF16, id="D32"), pytest.param(256, 2, 16, BF16, id="D256"),
           pytest.param(96, 4, 16, FP16, id="D96"), pytest.param(64, 4, 16, FP32, id="fp32")]


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim,groups,block_size,dtype", GPU_GRID + GPU_ODD)
@pytest.mark.parametrize("num_splits", [1, 4, 16])
def test_decode_gpu(head_dim, groups, block_size, dtype, num_splits):
    check_decode("cuda", dtype, head_dim, groups, block_size, decode_lengths(block_size, 2000), num_splits)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim,groups,block_size,dtype", GPU_GRID + GPU_ODD)
def test_prefill_gpu(head_dim, groups, block_size, dtype):
    check_prefill("cuda", dtype, head_dim, groups, block_size, prefill_chunks(block_size, 2000))


@pytest.mark.gpu
@pytest.mark.parametrize("window,with_sinks", [(128, True), (128, False), (None, True), (37, True)])
@pytest.mark.parametrize("num_splits", [1, 4])
def test_window_and_sinks_gpu(window, with_sinks, num_splits):
    """gpt-oss's shapes: head_dim 64, 8 query heads per kv head, a 128-token window."""
    check_decode("cuda", BF16, 64, 8, 16, decode_lengths(16, 2000), num_splits, window=window, with_sinks=with_sinks)
    check_prefill("cuda", BF16, 64, 8, 16, prefill_chunks(16, 2000), window=window, with_sinks=with_sinks)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim,kv_heads,dtype", [(128, 8, BF16), (64, 3, FP16), (96, 2, BF16)])
def test_write_kv_gpu(head_dim, kv_heads, dtype):
    check_write_kv("cuda", dtype, head_dim, kv_heads, 16, num_tokens=3000)


@pytest.mark.gpu
def test_decode_int64_block_table_gpu():
    check_decode("cuda", BF16, 128, 4, 16, decode_lengths(16, 500), 4, table_dtype=torch.int64)


@pytest.mark.gpu
def test_decode_step_in_cuda_graph_gpu():
    """write_kv + split-KV decode captured once, replayed on new lengths, tables, q, and padding rows."""
    torch.manual_seed(3)
    dtype, head_dim, groups, block_size, splits = BF16, 128, 4, 16, 4
    num_heads = KV_HEADS * groups
    replays = [[700, 33, 1, 300], [5, 0, 64, 1000]]  # context lens of the two replays; 0: a padding row
    lengths = [max(n, 1) for lens in replays for n in lens]
    k_cache, v_cache = _poisoned_cache(lengths, block_size, head_dim, dtype, "cuda")
    tables, _ = _fill(k_cache, v_cache, lengths)  # rows 0..3: the first replay's requests, 4..7: the second's
    batch = len(replays[0])
    static = dict(q=_strided(batch, num_heads, head_dim, dtype, "cuda"),
                  k=_strided(batch, KV_HEADS, head_dim, dtype, "cuda"),
                  v=_strided(batch, KV_HEADS, head_dim, dtype, "cuda"),
                  slots=torch.zeros(batch, dtype=torch.int64, device="cuda"),
                  tables=tables[:batch].clone(), ctx=torch.ones(batch, dtype=torch.int32, device="cuda"))
    out = torch.empty(batch, num_heads, head_dim, dtype=dtype, device="cuda")

    def step():
        ta.write_kv(static["k"], static["v"], k_cache, v_cache, static["slots"])
        ta.decode_attention(static["q"], k_cache, v_cache, static["tables"], static["ctx"], head_dim ** -0.5, splits,
                            out=out)

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for replay, new_lens in enumerate(replays):
        table = tables[replay * batch:(replay + 1) * batch]
        slots = [int(table[i, (n - 1) // block_size]) * block_size + (n - 1) % block_size if n else -1
                 for i, n in enumerate(new_lens)]
        static["slots"].copy_(torch.tensor(slots))
        static["tables"].copy_(table)
        static["ctx"].copy_(torch.tensor(new_lens))
        for name in ("q", "k", "v"):
            static[name].copy_(torch.randn(static[name].shape).to(dtype))
        out.fill_(float("nan"))
        graph.replay()
        ref = ta.reference_decode(static["q"], k_cache, v_cache, static["tables"], static["ctx"], head_dim ** -0.5)
        _assert_close(out, ref, dtype)


@pytest.mark.gpu
def test_cache_past_2_31_elements_gpu():
    """Blocks whose element offset exceeds 2^31 (a large cache): offsets must be computed in int64.
    Both terms overflow int32: block_id * block stride, and kv head 1's start."""
    kv_heads, block_size, head_dim, dtype = 2, 16, 128, BF16
    num_blocks = (1 << 31) // (block_size * head_dim) + 8
    if torch.cuda.mem_get_info()[0] < 20 * (1 << 30):
        pytest.skip("needs 20 GiB of free GPU memory")
    k_cache = torch.full((kv_heads, num_blocks, block_size, head_dim), float("nan"), dtype=dtype, device="cuda")
    v_cache = torch.full_like(k_cache, float("nan"))
    torch.manual_seed(4)
    lengths = [100, 40]
    tables = torch.tensor([[num_blocks - 1 - i for i in range(7)], [num_blocks - 8 - i for i in range(7)]],
                          dtype=torch.int32, device="cuda")
    for r, n in enumerate(lengths):
        pos = torch.arange(n, device="cuda")
        slots = tables[r, pos // block_size].long() * block_size + pos % block_size
        ta.write_kv(torch.randn(n, kv_heads, head_dim, device="cuda").to(dtype),
                    torch.randn(n, kv_heads, head_dim, device="cuda").to(dtype), k_cache, v_cache, slots)
    ctx = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    q = torch.randn(2, 8, head_dim, device="cuda").to(dtype)
    ref = ta.reference_decode(q, k_cache, v_cache, tables, ctx, 0.1)
    _assert_close(ta.decode_attention(q, k_cache, v_cache, tables, ctx, 0.1, 2), ref, dtype)
    qp = torch.randn(sum(lengths), 8, head_dim, device="cuda").to(dtype)
    cu = torch.tensor([0, 100, 140], dtype=torch.int32, device="cuda")
    ref = ta.reference_prefill(qp, k_cache, v_cache, cu, ctx, tables, 0.1)
    _assert_close(ta.prefill_attention(qp, k_cache, v_cache, cu, ctx, tables, 100, 0.1), ref, dtype)


# --- CPU: Triton interpreter ---------------------------------------------------------------------------

INTERP_CASES = [pytest.param(32, 1, 16, BF16, 1, id="D32-G1-bs16-bf16"),
                pytest.param(32, 4, 16, BF16, 3, id="D32-G4-bs16-bf16-split3"),
                pytest.param(64, 8, 8, FP16, 2, id="D64-G8-bs8-fp16-split2"),
                pytest.param(16, 2, 32, FP32, 1, id="D16-G2-bs32-fp32"),
                pytest.param(48, 2, 16, BF16, 2, id="D48-G2-bs16-bf16-split2")]


@needs_interpreter
@pytest.mark.parametrize("head_dim,groups,block_size,dtype,num_splits", INTERP_CASES)
def test_interp_decode(head_dim, groups, block_size, dtype, num_splits):
    check_decode("cpu", dtype, head_dim, groups, block_size, decode_lengths(block_size, 100), num_splits)


@needs_interpreter
@pytest.mark.parametrize("head_dim,groups,block_size,dtype,num_splits", INTERP_CASES)
def test_interp_prefill(head_dim, groups, block_size, dtype, num_splits):
    check_prefill("cpu", dtype, head_dim, groups, block_size, prefill_chunks(block_size, 100))


@needs_interpreter
def test_interp_prefill_two_query_tiles():
    # Chunks longer than BLOCK_M (128): several query tiles, the later ones with an unmasked prefix.
    check_prefill("cpu", BF16, 32, 2, 16, [(0, 200), (60, 150), (140, 1)])


@needs_interpreter
def test_interp_small_tiles(monkeypatch):
    # 16-key / 16-row tiles make the same short inputs span many tiles and splits.
    monkeypatch.setattr(ta, "prefill_config", lambda d, dtype: dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1))
    monkeypatch.setattr(ta, "decode_config", lambda d: dict(BLOCK_N=16, num_warps=4, num_stages=1))
    check_prefill("cpu", BF16, 32, 4, 8, prefill_chunks(8, 90))
    check_decode("cpu", BF16, 32, 4, 8, decode_lengths(8, 90), 5)


SMALL_PREFILL_TILES = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
SMALL_DECODE_TILES = {"BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
WINDOW_SINK_CASES = [pytest.param(8, True, id="window8-sinks"), pytest.param(13, False, id="window13"),
                     pytest.param(None, True, id="sinks"), pytest.param(1, True, id="window1-sinks")]


@needs_interpreter
@pytest.mark.parametrize("window,with_sinks", WINDOW_SINK_CASES)
def test_interp_window_and_sinks(window, with_sinks, monkeypatch):
    # Small tiles so that windows start mid-tile and mid-block and the splits cut through them.
    monkeypatch.setattr(ta, "prefill_config", lambda d, dtype: SMALL_PREFILL_TILES)
    monkeypatch.setattr(ta, "decode_config", lambda d: SMALL_DECODE_TILES)
    for splits in (1, 3):
        check_decode("cpu", BF16, 32, 4, 8, decode_lengths(8, 90), splits, window=window, with_sinks=with_sinks)
    check_prefill("cpu", BF16, 32, 4, 8, prefill_chunks(8, 90), window=window, with_sinks=with_sinks)


@needs_interpreter
def test_interp_window_and_sinks_default_tiles():
    # The shipped tile sizes (128-row query tiles, 64-key tiles), a window shorter than a tile, fp32.
    check_prefill("cpu", FP32, 16, 2, 16, [(0, 150), (70, 90), (140, 1)], window=20, with_sinks=True)
    check_decode("cpu", FP32, 16, 2, 16, decode_lengths(16, 150), 2, window=20, with_sinks=True)


@needs_interpreter
@pytest.mark.parametrize("head_dim,kv_heads,dtype", [(32, 2, BF16), (48, 3, FP16)])
def test_interp_write_kv(head_dim, kv_heads, dtype):
    check_write_kv("cpu", dtype, head_dim, kv_heads, 16)


def test_kernels_under_triton_interpreter():
    """Runs the test_interp_* subset in a subprocess with TRITON_INTERPRET=1 set before triton loads."""
    if not ta.HAS_TRITON:
        pytest.skip("triton is not installed")
    if INTERPRET:
        pytest.skip("this process already interprets: the test_interp_* tests run here directly")
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(__file__),
                           "-k", "test_interp_"], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-3000:]


# --- CPU: ahead-of-time compilation for Hopper -------------------------------------------------------

class _Recorder:
    """Stands in for a kernel: `kernel[grid](*args, **kwargs)` records the launch instead of running it."""

    def __init__(self, kernel, calls):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.kernel, args, kwargs))


def _triton_type(value) -> str:
    if isinstance(value, torch.Tensor):
        names = {BF16: "bf16", FP16: "fp16", FP32: "fp32", torch.int32: "i32", torch.int64: "i64"}
        return "*" + names[value.dtype]
    if isinstance(value, bool):
        return "i1"
    return "fp32" if isinstance(value, float) else "i32"


def _compile_sm90(kernel, args, kwargs):
    """Compile one recorded launch as the JIT would specialize it (16-aligned pointers, ints % 16)."""
    import triton
    from triton.backends.compiler import GPUTarget

    kwargs = dict(kwargs)
    options = {"num_warps": kwargs.pop("num_warps", 4), "num_stages": kwargs.pop("num_stages", 3)}
    names = [n for n in kernel.arg_names if n not in kwargs]
    signature = {n: _triton_type(a) for n, a in zip(names, args)}
    signature.update({n: "constexpr" for n in kwargs})
    attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n, a in zip(names, args)
             if isinstance(a, torch.Tensor) or (isinstance(a, int) and a % 16 == 0)}
    src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=kwargs, attrs=attrs)
    target = GPUTarget("cuda", 90, 32)
    backend = triton.compiler.make_backend(target)
    return triton.compile(src, target=target, options=backend.parse_options(options).__dict__)


def _spill_bytes(ptx: str, ptxas: str) -> int:
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        arch = re.search(r"\.target (sm_\w+)", ptx).group(1)
        log = subprocess.run([ptxas, "-v", f"-arch={arch}", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    return sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", log))


def test_kernels_compile_for_hopper(monkeypatch):
    if not ta.HAS_TRITON or INTERPRET:
        pytest.skip("needs triton, not in interpreter mode")
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("this triton wheel has no ptxas")
    calls = []
    for name in ("_write_kv_kernel", "_decode_kernel", "_decode_reduce_kernel", "_prefill_kernel"):
        monkeypatch.setattr(ta, name, _Recorder(getattr(ta, name), calls))
    meta = dict(device="meta")
    for head_dim, groups, dtype in ((128, 4, BF16), (96, 8, FP16), (256, 2, BF16), (64, 1, FP32)):
        k_cache = torch.empty(2, 100, 16, head_dim, dtype=dtype, **meta)
        tables = torch.empty(3, 10, dtype=torch.int32, **meta)
        lens = torch.empty(3, dtype=torch.int32, **meta)
        q = torch.empty(3, 2 * groups, head_dim, dtype=dtype, **meta)
        ta.write_kv(q[:, :2], q[:, :2], k_cache, k_cache.clone(), torch.empty(3, dtype=torch.int64, **meta))
        for splits in (1, 4):
            ta.decode_attention(q, k_cache, k_cache.clone(), tables, lens, 0.1, splits)
        cu = torch.empty(4, dtype=torch.int32, **meta)
        ta.prefill_attention(q, k_cache, k_cache.clone(), cu, lens, tables, 300, 0.1)
        # gpt-oss's options: a window and sinks (decode direct and split, prefill).
        sinks = torch.empty(2 * groups, dtype=FP32, **meta)
        for splits in (1, 4):
            ta.decode_attention(q, k_cache, k_cache.clone(), tables, lens, 0.1, splits, window=128, sinks=sinks)
        ta.prefill_attention(q, k_cache, k_cache.clone(), cu, lens, tables, 300, 0.1, window=128, sinks=sinks)
    assert len(calls) == 4 * 9
    for kernel, args, kwargs in calls:
        compiled = _compile_sm90(kernel, args, kwargs)
        what = f"{kernel.fn.__name__} {kwargs}"
        ptx = compiled.asm["ptx"]
        assert _spill_bytes(ptx, ptxas) == 0, f"register spills in {what}"
        if kernel.fn.__name__ in ("_decode_kernel", "_prefill_kernel"):
            assert "cp.async" in ptx, f"K/V loads are not pipelined in {what}"


# --- CPU: the references -----------------------------------------------------------------------------

@pytest.mark.parametrize("groups", [1, 3])
def test_references_match_dense_attention(groups):
    torch.manual_seed(5)
    head_dim, block_size = 16, 4
    lengths = [1, 9, 30]
    k_cache, v_cache = _poisoned_cache(lengths, block_size, head_dim, FP32, "cpu")
    tables, kvs = _fill(k_cache, v_cache, lengths)
    qs = [torch.randn(n, KV_HEADS * groups, head_dim) for n in lengths]
    dense = [pa.reference_attention(q, k, v, 0.3) for q, (k, v) in zip(qs, kvs)]
    ctx = torch.tensor(lengths, dtype=torch.int32)
    decode = ta.reference_decode(torch.stack([q[-1] for q in qs]), k_cache, v_cache, tables, ctx, 0.3)
    torch.testing.assert_close(decode, torch.stack([d[-1] for d in dense]))
    chunks = [min(n, 5) for n in lengths]  # the last tokens of each request, after a cached prefix
    cu = torch.tensor([0] + torch.tensor(chunks).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.cat([q[-c:] for q, c in zip(qs, chunks)])
    prefill = ta.reference_prefill(q, k_cache, v_cache, cu, ctx, tables, 0.3)
    torch.testing.assert_close(prefill, torch.cat([d[-c:] for d, c in zip(dense, chunks)]))
    # With a window and sinks.
    window, sinks = 4, torch.randn(KV_HEADS * groups)
    dense = [pa.reference_attention(q, k, v, 0.3, window, sinks) for q, (k, v) in zip(qs, kvs)]
    decode = ta.reference_decode(torch.stack([q[-1] for q in qs]), k_cache, v_cache, tables, ctx, 0.3, window, sinks)
    torch.testing.assert_close(decode, torch.stack([d[-1] for d in dense]))
    q = torch.cat([q[-c:] for q, c in zip(qs, chunks)])
    prefill = ta.reference_prefill(q, k_cache, v_cache, cu, ctx, tables, 0.3, window, sinks)
    torch.testing.assert_close(prefill, torch.cat([d[-c:] for d, c in zip(dense, chunks)]))


def test_dense_reference_window_and_sinks_by_hand():
    """The oracle itself, on numbers worked by hand: one head, head_dim 1, q = k = 1, v = position."""
    length, window = 5, 2
    q = k = torch.ones(length, 1, 1)
    v = torch.arange(length, dtype=torch.float32).view(length, 1, 1)
    out = pa.reference_attention(q, k, v, 1.0, window, torch.tensor([1.0]))
    # Equal scores: query p spreads 1 / (n + 1) over its n visible keys (p - 1 and p) and the sink.
    expected = [0 / 2] + [(p - 1 + p) / 3 for p in range(1, length)]
    torch.testing.assert_close(out.view(-1), torch.tensor(expected))


def test_choose_num_splits():
    assert ta.choose_num_splits(256, 8, 8192, 132) == 1  # 2048 programs already fill 2 waves
    assert ta.choose_num_splits(1, 8, 8192, 132) == 16  # capped
    assert ta.choose_num_splits(16, 8, 8192, 132) == 3  # 128 programs x 3 >= 264
    assert ta.choose_num_splits(1, 8, 300, 132) == 1  # too short to split
    assert ta.choose_num_splits(1, 8, 1024, 132) == 4  # 256 keys per split at least
