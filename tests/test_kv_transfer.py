"""KV transfer backends: exact block copies, failures that end in time, and nothing left behind.

CPU backends (fake, shm, zmq) run in the default tier, in one process and across two; cuda_ipc
runs under the `gpu` / `multi_gpu` markers. A source process fills its cache with
`_pattern(layout)`, which the puller recomputes to check the bytes it got.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import random
import signal
import threading
import time

import msgspec
import pytest
import torch

from tidal.protocol import KVLayout, KVSourceInfo
from tidal.transfer import KVTransferBackend, KVTransferConfig, KVTransferError, create_kv_transfer
from tidal.transfer.base import layout_bytes_per_block
from tidal.transfer.fake import FakeKVTransfer

LAYOUT = KVLayout(num_layers=3, num_kv_heads=2, num_blocks=16, block_size=4, head_dim=8, dtype="float32")
CPU_BACKENDS = ["fake", "shm", "zmq"]
CPU = torch.device("cpu")


def _pattern(layout: KVLayout, device: torch.device | str = "cpu") -> torch.Tensor:
    """A cache whose every element differs (exact in float32 for these small layouts)."""
    numel = math.prod(layout.shape)
    return torch.arange(1, numel + 1, dtype=torch.float32, device=device).view(layout.shape)


def _roundtrip(info: KVSourceInfo) -> KVSourceInfo:
    return msgspec.msgpack.decode(msgspec.msgpack.encode(info), type=KVSourceInfo)


def _random_pull(num_src_blocks: int, num_dst_blocks: int, n: int,
                 seed: int = 0) -> tuple[list[int], list[int]]:
    rng = random.Random(seed)
    return rng.sample(range(num_src_blocks), n), rng.sample(range(num_dst_blocks), n)


def _assert_pulled(expected_src: torch.Tensor, dst_cache: torch.Tensor, src_ids: list[int],
                   dst_ids: list[int]) -> None:
    """Destination blocks equal the source blocks; every other destination block is still zero."""
    expected_src = expected_src.to(dst_cache.device)
    assert torch.equal(dst_cache[:, :, :, dst_ids], expected_src[:, :, :, src_ids])
    others = sorted(set(range(dst_cache.shape[3])) - set(dst_ids))
    assert not dst_cache[:, :, :, others].any()


def _kv_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("kv-")]


@pytest.fixture
def make(tmp_path):
    """make(backend, worker_id, layout=LAYOUT, **config) -> backend; all closed at teardown,
    after which no transfer thread may be left."""
    created: list[KVTransferBackend] = []

    def _make(backend: str, worker_id: str, layout: KVLayout = LAYOUT, **config) -> KVTransferBackend:
        config.setdefault("timeout_s", 5.0)
        made = create_kv_transfer(layout, CPU, worker_id,
                                  KVTransferConfig(backend=backend, scratch_dir=str(tmp_path), **config))
        created.append(made)
        return made

    yield _make
    for backend in created:
        backend.close()
    assert _kv_threads() == []


# ---- one process --------------------------------------------------------------------------

ODD_ROWS = dict(dtype="bfloat16", block_size=1, head_dim=3)  # 6-byte rows: no 8-byte word view


@pytest.mark.parametrize("layout_change", [{}, dict(dtype="bfloat16"), ODD_ROWS], ids=["f32", "bf16", "odd"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_pull_copies_exactly_the_blocks(make, backend, layout_change):
    src_layout = msgspec.structs.replace(LAYOUT, **layout_change)
    dst_layout = msgspec.structs.replace(src_layout, num_blocks=24)  # pools may differ in size
    src = make(backend, "prefill-0", src_layout)
    dst = make(backend, "decode-0", dst_layout)
    src.cache.copy_(torch.randn(src_layout.shape))
    src_ids, dst_ids = _random_pull(src_layout.num_blocks, dst_layout.num_blocks, 7)

    transfer = dst.start_pull(_roundtrip(src.source_info()), src_ids, dst_ids)
    transfer.wait(5)

    _assert_pulled(src.cache, dst.cache, src_ids, dst_ids)
    assert transfer.num_bytes == 7 * layout_bytes_per_block(src_layout)
    assert transfer.seconds >= 0
    # A second pull on the same source reuses what the first opened.
    transfer = dst.start_pull(src.source_info(), src_ids[:2], [dst_ids[0], 23])
    transfer.wait(5)
    assert torch.equal(dst.cache[:, :, :, 23], src.cache[:, :, :, src_ids[1]])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_mismatched_pulls_are_refused(make, backend):
    src = make(backend, "prefill-0")
    other = make(backend, "decode-0", msgspec.structs.replace(LAYOUT, head_dim=16))
    dst = make(backend, "decode-1")
    info = src.source_info()
    with pytest.raises(KVTransferError, match="layouts differ"):
        other.start_pull(info, [0], [0])
    with pytest.raises(KVTransferError, match="backend"):
        dst.start_pull(msgspec.structs.replace(info, backend="other"), [0], [0])
    with pytest.raises(KVTransferError, match="out of range"):
        dst.start_pull(info, [LAYOUT.num_blocks], [0])
    with pytest.raises(KVTransferError, match="length"):
        dst.start_pull(info, [0, 1], [0])
    assert not dst.cache.any()


def test_zmq_server_refuses_a_pull_meant_for_another_worker(make):
    src = make("zmq", "prefill-0")
    dst = make("zmq", "decode-0")
    stale = msgspec.structs.replace(src.source_info(), worker_id="prefill-9")  # a reused endpoint
    with pytest.raises(KVTransferError, match="refused"):
        dst.start_pull(stale, [0], [0]).wait(5)
    dst.start_pull(src.source_info(), [0], [0]).wait(5)  # a fresh connection works


def test_fake_delay_and_injected_failure(make):
    src = make("fake", "prefill-0")
    dst = make("fake", "decode-0", debug_delay_s=0.2)
    src.cache.copy_(_pattern(LAYOUT))
    assert isinstance(dst, FakeKVTransfer)
    dst.fail_next = True
    failed = dst.start_pull(src.source_info(), [1, 2], [3, 4])
    assert not failed.done()
    with pytest.raises(KVTransferError, match="injected"):
        failed.wait(2)
    assert failed.seconds >= 0.2
    assert not dst.cache.any()

    transfer = dst.start_pull(src.source_info(), [1, 2], [3, 4])
    assert not transfer.done()
    transfer.wait(2)
    _assert_pulled(src.cache, dst.cache, [1, 2], [3, 4])


@pytest.mark.parametrize("backend", ["shm", "zmq"])
def test_pull_not_done_in_time_fails_and_writes_nothing(make, backend):
    src = make(backend, "prefill-0")
    dst = make(backend, "decode-0", timeout_s=0.2, debug_delay_s=0.6)
    src.cache.copy_(_pattern(LAYOUT))
    transfer = dst.start_pull(src.source_info(), [0, 1], [0, 1])
    with pytest.raises(KVTransferError, match="within 0.2 s"):
        transfer.wait(2)
    assert transfer.seconds < 0.5
    time.sleep(0.6)  # past the delay: the worker thread has given up without writing
    assert not dst.cache.any()


def test_close_releases_file_and_threads(tmp_path):
    config = KVTransferConfig(backend="shm", scratch_dir=str(tmp_path))
    shm = create_kv_transfer(LAYOUT, CPU, "w/0", config)
    path = shm.source_info().address
    assert os.path.getsize(path) == LAYOUT.num_blocks * layout_bytes_per_block(LAYOUT)
    assert os.path.dirname(path) == str(tmp_path)
    shm.close()
    assert not os.path.exists(path)

    zmq_config = KVTransferConfig(backend="zmq")
    server = create_kv_transfer(LAYOUT, CPU, "prefill-0", zmq_config)
    client = create_kv_transfer(LAYOUT, CPU, "decode-0", zmq_config)
    client.start_pull(server.source_info(), [0], [0]).wait(5)
    assert {"kv-server-prefill-0", "kv-server-decode-0"} <= set(_kv_threads())
    client.close()
    server.close()
    assert _kv_threads() == []


def test_unknown_backend_names_the_valid_ones():
    with pytest.raises(ValueError, match="cuda_ipc"):
        create_kv_transfer(LAYOUT, CPU, "w", KVTransferConfig(backend="rdma"))


# ---- two processes ------------------------------------------------------------------------

def _source_process(backend: str, layout_msg: bytes, device: str, scratch_dir: str, conn) -> None:
    """Child: create the source backend, fill it with `_pattern`, publish its KVSourceInfo
    (msgspec bytes), then hold the cache until the parent says stop (or dies)."""
    layout = msgspec.msgpack.decode(layout_msg, type=KVLayout)
    source = create_kv_transfer(layout, torch.device(device), "prefill-0",
                                KVTransferConfig(backend=backend, scratch_dir=scratch_dir))
    source.cache.copy_(_pattern(layout, device))
    if source.device.type == "cuda":
        torch.cuda.synchronize(source.device)
    conn.send_bytes(msgspec.msgpack.encode(source.source_info()))
    try:
        conn.recv_bytes()
    except EOFError:
        pass
    source.close()


class _SourceProcess:
    """A spawned source worker; `info` is what it published."""

    def __init__(self, backend: str, layout: KVLayout, device: str, scratch_dir: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child_conn = ctx.Pipe()
        args = (backend, msgspec.msgpack.encode(layout), device, scratch_dir, child_conn)
        self.process = ctx.Process(target=_source_process, args=args, daemon=True)
        self.process.start()
        child_conn.close()
        if not self.conn.poll(60):
            raise TimeoutError("the source process did not start")
        self.info = msgspec.msgpack.decode(self.conn.recv_bytes(), type=KVSourceInfo)

    def kill(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.join(10)

    def stop(self) -> None:
        if self.process.is_alive():
            self.conn.send_bytes(b"stop")
            self.process.join(10)
        if self.process.is_alive():
            self.kill()
        self.conn.close()


def _assert_pull_fails(backend: KVTransferBackend, info: KVSourceInfo, within_s: float) -> None:
    """A pull from `info` fails (at its start or when it ends) within `within_s`."""
    started = time.monotonic()
    with pytest.raises(KVTransferError):
        backend.start_pull(info, [0, 1], [0, 1]).wait(within_s + 5)
    assert time.monotonic() - started < within_s


@pytest.mark.parametrize("backend", ["shm", "zmq"])
def test_pull_across_processes_then_source_killed(make, tmp_path, backend):
    source = _SourceProcess(backend, LAYOUT, "cpu", str(tmp_path))
    try:
        assert source.info.pid == source.process.pid
        dst = make(backend, "decode-0", timeout_s=1.0)
        slow = make(backend, "decode-1", timeout_s=1.5, debug_delay_s=0.3)
        src_ids, dst_ids = _random_pull(LAYOUT.num_blocks, LAYOUT.num_blocks, 9, seed=1)
        dst.start_pull(source.info, src_ids, dst_ids).wait(5)
        _assert_pulled(_pattern(LAYOUT), dst.cache, src_ids, dst_ids)

        in_flight = slow.start_pull(source.info, src_ids, dst_ids)
        source.kill()  # during the pull's delay, before it reads or asks anything
        started = time.monotonic()
        with pytest.raises(KVTransferError, match="died|no KV"):
            in_flight.wait(5)
        assert time.monotonic() - started < 1.5 + 0.5

        _assert_pull_fails(dst, source.info, within_s=1.0 + 0.5)  # dead before the pull
    finally:
        source.stop()


# ---- GPU ----------------------------------------------------------------------------------

GPU_LAYOUT = KVLayout(num_layers=5, num_kv_heads=2, num_blocks=32, block_size=4, head_dim=8, dtype="float32")


def _cuda_backend(worker_id: str, device: str, **config) -> KVTransferBackend:
    config.setdefault("timeout_s", 5.0)
    config = KVTransferConfig(backend="auto", **config)
    return create_kv_transfer(GPU_LAYOUT, torch.device(device), worker_id, config)


@pytest.mark.gpu
def test_cuda_ipc_pull_in_one_process():
    src = _cuda_backend("prefill-0", "cuda:0")
    dst = _cuda_backend("decode-0", "cuda:0")
    try:
        assert src.name == "cuda_ipc"
        src.cache.copy_(_pattern(GPU_LAYOUT, "cuda:0"))
        src_ids, dst_ids = _random_pull(GPU_LAYOUT.num_blocks, GPU_LAYOUT.num_blocks, 11)
        dst.start_pull(_roundtrip(src.source_info()), src_ids, dst_ids).wait(10)
        _assert_pulled(_pattern(GPU_LAYOUT), dst.cache, src_ids, dst_ids)
    finally:
        dst.close()
        src.close()


def _check_cuda_ipc_across_processes(dst_device: str, chunk_layers: list[int]) -> None:
    source = _SourceProcess("cuda_ipc", GPU_LAYOUT, "cuda:0", "")
    backends: list[KVTransferBackend] = []
    try:
        for c in chunk_layers:
            backends.append(_cuda_backend(f"decode-{c}", dst_device, chunk_layers=c))
        slow = _cuda_backend("decode-slow", dst_device, timeout_s=2.0, debug_delay_s=0.5)
        backends.append(slow)
        for seed, dst in enumerate(backends):
            src_ids, dst_ids = _random_pull(GPU_LAYOUT.num_blocks, GPU_LAYOUT.num_blocks, 13, seed)
            dst.start_pull(source.info, src_ids, dst_ids).wait(10)
            _assert_pulled(_pattern(GPU_LAYOUT), dst.cache, src_ids, dst_ids)
        in_flight = slow.start_pull(source.info, [0, 1], [0, 1])
        source.kill()
        with pytest.raises(KVTransferError, match="died"):
            in_flight.wait(5)
        _assert_pull_fails(backends[0], source.info, within_s=1.0)
    finally:
        for dst in backends:
            dst.close()
        source.stop()


@pytest.mark.gpu
def test_cuda_ipc_pull_across_processes_one_gpu():
    _check_cuda_ipc_across_processes("cuda:0", chunk_layers=[4])


@pytest.mark.multi_gpu
def test_cuda_ipc_pull_across_processes_two_gpus():
    _check_cuda_ipc_across_processes("cuda:1", chunk_layers=[1, 2, 4, 8])

