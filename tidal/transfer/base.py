"""KV transfer: one interface, backends by mechanism.

A worker owns one `KVTransferBackend`, created before its model runner: the backend allocates
the worker's whole KV cache as one tensor of `KVLayout.shape`
([num_layers, 2, num_kv_heads, num_blocks, block_size, head_dim]) in memory its peers can
reach (a shared-memory file, a CUDA allocation exported through an IPC handle, plain memory
served over ZMQ), and describes that memory in a `KVSourceInfo`.

A decode worker pulls: `start_pull(source, src_block_ids, dst_block_ids)` copies those blocks of
the source worker's cache into its own, without blocking the caller; the engine polls the
returned `Transfer` between steps. A transfer ends `done()` either way; `result()` then raises
`KVTransferError` when it failed (source gone, timeout, bad layout). Nothing in this package
touches requests or the scheduler: block ids in, bytes copied, done or failed out.
"""

from __future__ import annotations

import abc
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

import torch

from tidal.config import NonNegative, Positive, validate_fields
from tidal.curve import CurveKeys
from tidal.protocol import KVLayout, KVSourceInfo

logger = logging.getLogger(__name__)


class KVTransferError(RuntimeError):
    """A transfer failed; the destination blocks hold nothing usable."""


@dataclass(frozen=True)
class KVTransferConfig:
    backend: Literal["auto", "shm", "zmq", "cuda_ipc", "fake"] = "auto"
    """`auto` (shm on CPU, cuda_ipc on CUDA), `shm`, `zmq`, `cuda_ipc` or `fake`."""
    timeout_s: Annotated[float, Positive] = 30.0
    """A pull not finished by then fails; a prefill worker's hold on blocks lasts this long twice."""
    debug_delay_s: Annotated[float, NonNegative] = 0.0
    """Fault testing only: every pull waits this long before it finishes."""
    scratch_dir: str | None = None
    """Where the shm backend creates its cache file (a /dev/shm folder the launcher owns)."""
    zmq_address: str | None = None
    """Endpoint the zmq backend's KV server binds (tcp://host:port or ipc://path)."""
    zmq_advertise_host: str | None = None
    """The host peers dial for the zmq backend's KV server (it binds a wildcard, say); None: the
    bound host, a wildcard replaced by this host's name."""
    zmq_curve: CurveKeys | None = None
    """The zmq backend's CURVE keys (cluster mode with `curve_key_dir`): its KV server serves with
    them and admits only the clients they allow; its pulls dial with them. None: plain TCP."""
    chunk_layers: int = 0
    """cuda_ipc: layers per pipelined chunk (the gather, peer copy and scatter of one chunk overlap
    those of its neighbours; each of the two staging buffers per GPU holds one chunk). 0 sizes
    chunks per pull to about 32 MiB: few launches for a small pull, a short pipeline fill for a big one."""

    def __post_init__(self) -> None:
        validate_fields(self)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def layout_bytes_per_block(layout: KVLayout) -> int:
    itemsize = torch.empty((), dtype=torch_dtype(layout.dtype)).element_size()
    return 2 * layout.num_layers * layout.num_kv_heads * layout.block_size * layout.head_dim * itemsize


def block_rows(cache: torch.Tensor) -> torch.Tensor:
    """[..., num_blocks, block_size, head_dim] -> [rows, num_blocks, block_size * head_dim]:
    a block is one column of every row, so copying blocks is an index_select/index_copy_ on dim 1.
    Works on the whole cache, one layer of it, or a contiguous range of layers."""
    *_, num_blocks, block_size, head_dim = cache.shape
    return cache.view(-1, num_blocks, block_size * head_dim)


def as_words(rows: torch.Tensor) -> torch.Tensor:
    """The same bytes as 8-byte elements when the last dimension allows. Torch's index kernels
    move one element per thread, so this is what block copies index: an H200 gathered bf16 at
    1.3 TB/s and int64 at 3.7 TB/s; a CPU 1.4x faster."""
    return rows.view(torch.int64) if rows.shape[-1] * rows.element_size() % 8 == 0 else rows


def copy_blocks(src_cache: torch.Tensor, dst_cache: torch.Tensor, src_block_ids: Sequence[int],
                dst_block_ids: Sequence[int]) -> None:
    """Copies whole blocks between two caches of `KVLayout.shape` (CPU backends, tests), one layer
    at a time so the gathered staging tensor stays one layer's worth."""
    src_idx = torch.tensor(src_block_ids, dtype=torch.long, device=src_cache.device)
    dst_idx = torch.tensor(dst_block_ids, dtype=torch.long, device=dst_cache.device)
    for src_layer, dst_layer in zip(src_cache, dst_cache):  # each [2, H, num_blocks, bs, D]
        staged = as_words(block_rows(src_layer)).index_select(1, src_idx)  # [2H, n, bs*D words]
        as_words(block_rows(dst_layer)).index_copy_(1, dst_idx, staged.to(dst_layer.device))


def process_alive(pid: int) -> bool:
    """Whether process `pid` (on this host) still runs; a zombie counts as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            state = stat.read().rpartition(b")")[2].split()[0]  # the field after "(comm)"
    except FileNotFoundError:
        return not os.path.isdir("/proc")  # gone since kill(), or no procfs to ask
    return state != b"Z"


class Transfer(abc.ABC):
    """One pull in flight. `done()` never blocks; `result()` raises if it failed."""

    def __init__(self, num_bytes: int) -> None:
        self.num_bytes = num_bytes
        self.started = time.monotonic()
        self.finished: float | None = None

    @property
    def seconds(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    @abc.abstractmethod
    def done(self) -> bool: ...

    @abc.abstractmethod
    def result(self) -> None:
        """Returns when the transfer succeeded; raises KVTransferError when it failed.
        Only valid once `done()` is True."""

    def wait(self, timeout_s: float = 60.0) -> None:
        """Blocks until done, then returns or raises like `result()` (tests and benchmarks)."""
        deadline = time.monotonic() + timeout_s
        while not self.done():
            if time.monotonic() > deadline:
                raise KVTransferError("timed out waiting for the transfer")
            time.sleep(0.0005)
        self.result()


class ThreadTransfer(Transfer):
    """A pull carried out by a backend's worker thread (`run`), polled by the engine (`done`).

    Invariant: once `done()` is True nothing writes to the destination blocks any more. The
    thread calls `claim()` before it touches them; a deadline that passes before the claim ends
    the transfer as timed out and the claim fails. A claimed write runs to its end (a bounded
    local copy), so `done()` can stay False a little past the deadline."""

    def __init__(self, num_bytes: int, source: KVSourceInfo, timeout_s: float) -> None:
        super().__init__(num_bytes)
        self.source = source
        self.timeout_s = timeout_s
        self.deadline = self.started + timeout_s
        self._lock = threading.Lock()
        self._writing = False
        self._done = False
        self._error: KVTransferError | None = None

    def claim(self) -> bool:
        with self._lock:
            self._writing = not self._done
            return self._writing

    def run(self, job: Callable[[], None]) -> None:
        """Runs `job` on the worker thread and records how it ended."""
        try:
            job()
        except KVTransferError as exc:
            self._finish(exc)
        except Exception as exc:  # a bug or a torch/zmq error: fail this pull, keep the thread
            logger.exception("KV pull from %s failed", self.source.worker_id)
            self._finish(KVTransferError(f"pull from {self.source.worker_id} failed: {exc!r}"))
        else:
            self._finish(None)

    def _finish(self, error: KVTransferError | None) -> None:
        with self._lock:
            if not self._done:  # a timeout that came first stands
                self._done, self._writing, self._error = True, False, error
                self.finished = time.monotonic()

    def done(self) -> bool:
        with self._lock:
            if not self._done and not self._writing and time.monotonic() > self.deadline:
                self._done, self.finished = True, time.monotonic()
                self._error = KVTransferError(f"no KV from source {self.source.worker_id} "
                                              f"within {self.timeout_s:g} s")
            return self._done

    def result(self) -> None:
        if not self.done():
            raise KVTransferError("result() called before the transfer is done")
        if self._error is not None:
            raise self._error


class KVTransferBackend(abc.ABC):
    """One per worker, bound to the KV cache tensor it allocated (`self.cache`)."""

    name: str = "?"

    def __init__(self, layout: KVLayout, device: torch.device, worker_id: str,
                 config: KVTransferConfig) -> None:
        self.layout = layout
        self.device = torch.device(device)
        self.worker_id = worker_id
        self.config = config
        self.cache: torch.Tensor = self._allocate()

    @abc.abstractmethod
    def _allocate(self) -> torch.Tensor:
        """The worker's KV cache: a zeroed tensor of `layout.shape` that peers can reach."""

    @abc.abstractmethod
    def source_info(self) -> KVSourceInfo:
        """How a peer reads this worker's cache."""

    @abc.abstractmethod
    def start_pull(self, source: KVSourceInfo, src_block_ids: list[int],
                   dst_block_ids: list[int]) -> Transfer:
        """Copy blocks `src_block_ids` of the source's cache into `dst_block_ids` of ours."""

    def forget_source(self, worker_id: str) -> None:
        """Drop anything opened for that source (it died or left)."""

    def close(self) -> None:
        """Release what the backend holds (files, sockets, threads, opened peer memory)."""

    def layer_views(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(k, v) per layer, each [num_kv_heads, num_blocks, block_size, head_dim]: the model's view."""
        return [(self.cache[i, 0], self.cache[i, 1]) for i in range(self.layout.num_layers)]

    def check_source(self, source: KVSourceInfo, src_block_ids: list[int], dst_block_ids: list[int]) -> None:
        """Raises KVTransferError when the source can't be copied from into this cache."""
        if source.backend != self.name:
            raise KVTransferError(f"source {source.worker_id} uses backend {source.backend!r}, "
                                  f"this worker {self.name!r}")
        ours, theirs = self.layout, source.layout
        if (ours.num_layers, ours.num_kv_heads, ours.block_size, ours.head_dim, ours.dtype) != (
                theirs.num_layers, theirs.num_kv_heads, theirs.block_size, theirs.head_dim, theirs.dtype):
            raise KVTransferError(f"KV layouts differ: source {theirs}, destination {ours}")
        if len(src_block_ids) != len(dst_block_ids):
            raise KVTransferError("source and destination block lists differ in length")
        if src_block_ids and (min(src_block_ids) < 0 or max(src_block_ids) >= theirs.num_blocks):
            raise KVTransferError("source block id out of range")
        if dst_block_ids and (min(dst_block_ids) < 0 or max(dst_block_ids) >= ours.num_blocks):
            raise KVTransferError("destination block id out of range")
