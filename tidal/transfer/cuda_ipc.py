"""CUDA IPC KV transfer between GPU workers of one host, each in its own process.

Each backend owns its cache as one CUDA allocation and exports it once, as torch's IPC handle of
the cache's storage (`_share_cuda_`: device, memory handle, size, offset, ref-counter file and
offset, event handle, event flag; plain ints, bytes and bools carried in `KVSourceInfo.handle`).
A peer opens it with `UntypedStorage._new_shared_cuda`, which maps the source's memory into the
peer's address space on the source's GPU; opened caches are kept per (worker id, pid) until
`forget_source` or `close`. Device indices must mean the same GPU in both processes (the same
CUDA_VISIBLE_DEVICES). A source in this very process (tests) is read directly, without IPC.

A pull is a few large asynchronous copies launched from the caller's thread, which never waits
for the GPU. The caches are viewed as rows [L*2*H, num_blocks, block_size*head_dim] (as 8-byte
words where the row allows, which the gather and scatter kernels move about 3x faster than
2-byte elements) and cut into chunks of `config.chunk_layers` layers (0: about 32 MiB a chunk). Each
chunk goes through three stages:

    gather   (source GPU):  peer cache rows, blocks src_ids -> staging buffer on the source GPU
    copy     (source GPU):  that staging -> a staging buffer on our GPU (peer copy: NVLink/PCIe)
    scatter  (our GPU):     that staging -> our cache, blocks dst_ids

Chunk i runs on stream pair i % 2 of the path's `_Lane` (a source-GPU stream for gather and
copy, one of ours for scatter) with that pair's staging buffers, so stream order alone keeps a
buffer from being overwritten before it is read, and gather(i+1), copy(i) and scatter(i-1)
overlap. No events are needed between stages: a cross-GPU `copy_` runs on the source GPU's
current stream and syncs both ways with our GPU's current stream, which the launch sets to the
pair's streams. Our streams first wait for the engine's current stream (the destination blocks
may have been freed by kernels still queued there); the engine starts pulls between steps, when
that stream is idle. A source on our own GPU needs no staging: gather and scatter run on one stream.
Pulls from one source GPU share its lane, so they queue rather than compete.

`done()` queries an event after the last scatter, then checks that the source pid is alive (a
source that died fails the pull). A pull not done within `timeout_s` fails too; the engine's
current stream is then made to wait for the late copies, so nothing the engine later does with
those blocks races them. `forget_source` and `close` wait for the lanes before unmapping peer memory.
"""

from __future__ import annotations

import math
import os
import statistics
import time
import weakref

import numpy as np
import torch

from tidal.protocol import KVLayout, KVSourceInfo
from tidal.transfer.base import (KVTransferBackend, KVTransferConfig, KVTransferError, Transfer, as_words,
                                 block_rows, layout_bytes_per_block, process_alive, torch_dtype)

_LOCAL: weakref.WeakValueDictionary[str, CudaIpcKVTransfer] = weakref.WeakValueDictionary()
_HANDLE_FIELDS = 8  # what `_share_cuda_` returns and `_new_shared_cuda` takes
_AUTO_CHUNK_BYTES = 32 << 20  # measured on 2 H200s: 16-64 MiB chunks pull 1k-16k tokens fastest


def _pinned_ids(block_ids: list[int]) -> torch.Tensor:
    return torch.from_numpy(np.array(block_ids, dtype=np.int64)).pin_memory()


class _Lane:
    """The streams of pulls from one source GPU into ours: two (source GPU, our GPU) pairs."""

    def __init__(self, src_device: torch.device, dst_device: torch.device) -> None:
        self.pairs = [(torch.cuda.Stream(src_device), torch.cuda.Stream(dst_device)) for _ in range(2)]

    def synchronize(self) -> None:
        for pair in self.pairs:
            for stream in pair:
                stream.synchronize()


class CudaTransfer(Transfer):
    """Done when its last event has fired (and any debug delay passed), or at its deadline."""

    def __init__(self, num_bytes: int, source: KVSourceInfo, last: torch.cuda.Event, peer: torch.Tensor,
                 config: KVTransferConfig, device: torch.device, start: torch.cuda.Event | None = None) -> None:
        super().__init__(num_bytes)
        self.source = source
        self._start = start
        self._last = last
        self._gpu_seconds: float | None = None
        self._peer = peer  # the source's memory stays mapped while the copies read it
        self._ready_at = self.started + config.debug_delay_s
        self._deadline = self.started + config.timeout_s
        self._timeout_s = config.timeout_s
        self._device = device
        self._error: KVTransferError | None = None

    def done(self) -> bool:
        if self.finished is not None:
            return True
        now = time.monotonic()
        if now >= self._ready_at and self._last.query():
            if not process_alive(self.source.pid):
                source = self.source
                self._error = KVTransferError(f"source worker {source.worker_id} (pid {source.pid}) "
                                              "died during the transfer")
            self._end()
        elif now > self._deadline:
            torch.cuda.current_stream(self._device).wait_event(self._last)
            self._error = KVTransferError(f"no KV from source {self.source.worker_id} "
                                          f"within {self._timeout_s:g} s")
            self._end()
        return self.finished is not None

    def _end(self) -> None:
        self.finished = time.monotonic()
        self._peer = None
        if self._error is None and self._start is not None:
            self._gpu_seconds = self._start.elapsed_time(self._last) / 1e3

    @property
    def seconds(self) -> float:
        """GPU-timed latency of a finished pull (launch to last copy), not when it was polled."""
        return self._gpu_seconds if self._gpu_seconds is not None else super().seconds

    def result(self) -> None:
        if not self.done():
            raise KVTransferError("result() called before the transfer is done")
        if self._error is not None:
            raise self._error


class CudaIpcKVTransfer(KVTransferBackend):
    name = "cuda_ipc"

    def __init__(self, layout: KVLayout, device: torch.device, worker_id: str,
                 config: KVTransferConfig) -> None:
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"the cuda_ipc KV transfer backend serves CUDA caches, not {device}")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        super().__init__(layout, device, worker_id, config)
        self._handle: list[int | bytes | bool | None] | None = None
        self._peers: dict[tuple[str, int], torch.Tensor] = {}  # (worker_id, pid) -> opened cache
        self._lanes: dict[torch.device, _Lane] = {}  # by source GPU
        _LOCAL[worker_id] = self

    def _allocate(self) -> torch.Tensor:
        return torch.zeros(self.layout.shape, dtype=torch_dtype(self.layout.dtype), device=self.device)

    def source_info(self) -> KVSourceInfo:
        if self._handle is None:  # export once: each export wraps the storage in a new ref counter
            self._handle = list(self.cache.untyped_storage()._share_cuda_())
        return KVSourceInfo(backend=self.name, worker_id=self.worker_id, pid=os.getpid(), layout=self.layout,
                            device_index=self.device.index, handle=self._handle)

    def peer_cache(self, source: KVSourceInfo) -> torch.Tensor:
        """The source's whole cache, [L, 2, H, num_blocks, bs, D] on its GPU (opened once)."""
        key = (source.worker_id, source.pid)
        if key not in self._peers:
            self._peers[key] = self._open(source)
        return self._peers[key]

    def _open(self, source: KVSourceInfo) -> torch.Tensor:
        if source.pid == os.getpid():
            local = _LOCAL.get(source.worker_id)
            if local is None:
                raise KVTransferError(f"source worker {source.worker_id} is closed")
            return local.cache
        if len(source.handle) != _HANDLE_FIELDS:
            raise KVTransferError(f"source worker {source.worker_id} sent a malformed CUDA IPC handle")
        torch.cuda.init()
        try:
            storage = torch.UntypedStorage._new_shared_cuda(*source.handle)
        except RuntimeError as exc:
            raise KVTransferError(f"cannot open the KV cache of {source.worker_id}: {exc}") from exc
        layout = source.layout
        dtype = torch_dtype(layout.dtype)
        if storage.nbytes() < math.prod(layout.shape) * dtype.itemsize:
            raise KVTransferError(f"the CUDA memory of {source.worker_id} is smaller than its layout")
        stride = torch.empty(layout.shape, device="meta").stride()
        return torch.empty(0, dtype=dtype, device=storage.device).set_(storage, 0, layout.shape, stride)

    def start_pull(self, source: KVSourceInfo, src_block_ids: list[int],
                   dst_block_ids: list[int]) -> CudaTransfer:
        self.check_source(source, src_block_ids, dst_block_ids)
        if not process_alive(source.pid):
            raise KVTransferError(f"source worker {source.worker_id} (pid {source.pid}) is not running")
        peer = self.peer_cache(source)
        if peer.device not in self._lanes:
            self._lanes[peer.device] = _Lane(peer.device, self.device)
        lane = self._lanes[peer.device]
        engine = torch.cuda.current_stream(self.device)
        for _, dst_stream in lane.pairs:
            dst_stream.wait_stream(engine)
        # The launches switch current streams (and so the current device); put them back after.
        restore, device = [torch.cuda.current_stream(peer.device), engine], torch.cuda.current_device()
        start = torch.cuda.Event(enable_timing=True)
        start.record(lane.pairs[0][1])  # GPU time from here to `last` is the pull's latency
        try:
            if peer.device == self.device:
                last = self._launch_local(peer, lane, src_block_ids, dst_block_ids)
            else:
                last = self._launch_pipelined(peer, lane, src_block_ids, dst_block_ids)
        finally:
            for stream in restore:
                torch.cuda.set_stream(stream)
            torch.cuda.set_device(device)
        num_bytes = len(src_block_ids) * layout_bytes_per_block(self.layout)
        return CudaTransfer(num_bytes, source, last, peer, self.config, self.device, start)

    def _chunks(self, num_blocks: int) -> list[slice]:
        """Row ranges of `block_rows(cache)`, `config.chunk_layers` layers each (0: ~32 MiB)."""
        layer_bytes = num_blocks * layout_bytes_per_block(self.layout) // self.layout.num_layers
        chunk_layers = self.config.chunk_layers or _AUTO_CHUNK_BYTES // max(1, layer_bytes)
        rows_per_layer = 2 * self.layout.num_kv_heads
        num_rows = self.layout.num_layers * rows_per_layer
        chunk_rows = rows_per_layer * max(1, chunk_layers)
        return [slice(first, min(first + chunk_rows, num_rows)) for first in range(0, num_rows, chunk_rows)]

    def _launch_local(self, peer: torch.Tensor, lane: _Lane, src_block_ids: list[int],
                      dst_block_ids: list[int]) -> torch.cuda.Event:
        """Source on our GPU: gather and scatter each chunk on one stream (the caller restores
        the current stream)."""
        stream = lane.pairs[0][1]
        torch.cuda.set_stream(stream)
        src_idx = _pinned_ids(src_block_ids).to(self.device, non_blocking=True)
        dst_idx = _pinned_ids(dst_block_ids).to(self.device, non_blocking=True)
        src_rows = as_words(block_rows(peer))  # [L*2H, num_blocks, row]
        dst_rows = as_words(block_rows(self.cache))
        for rows in self._chunks(len(src_block_ids)):
            dst_rows[rows].index_copy_(1, dst_idx, src_rows[rows].index_select(1, src_idx))
        last = torch.cuda.Event(enable_timing=True)
        last.record(stream)
        return last

    def _launch_pipelined(self, peer: torch.Tensor, lane: _Lane, src_block_ids: list[int],
                          dst_block_ids: list[int]) -> torch.cuda.Event:
        """Source on another GPU: gather there, peer-copy, scatter here, chunks alternating
        between the lane's two stream pairs (the caller restores the current streams)."""
        src_rows = as_words(block_rows(peer))  # [L*2H, num_blocks, row]
        dst_rows = as_words(block_rows(self.cache))
        chunks = self._chunks(len(src_block_ids))
        shape = (chunks[0].stop, len(src_block_ids), src_rows.shape[2])  # one chunk: [rows, n, row]
        src_ids, dst_ids = _pinned_ids(src_block_ids), _pinned_ids(dst_block_ids)
        pairs = []  # per stream pair: its block ids and staging, made (and only used) on its streams
        for src_stream, dst_stream in lane.pairs[:len(chunks)]:
            torch.cuda.set_stream(src_stream)
            torch.cuda.set_stream(dst_stream)
            pairs.append((src_stream, dst_stream,
                          src_ids.to(peer.device, non_blocking=True),
                          dst_ids.to(self.device, non_blocking=True),
                          torch.empty(shape, dtype=src_rows.dtype, device=peer.device),
                          torch.empty(shape, dtype=dst_rows.dtype, device=self.device)))
        for i, rows in enumerate(chunks):
            src_stream, dst_stream, src_idx, dst_idx, src_stage, dst_stage = pairs[i % 2]
            src_stage, dst_stage = src_stage[:rows.stop - rows.start], dst_stage[:rows.stop - rows.start]
            torch.cuda.set_stream(src_stream)
            torch.cuda.set_stream(dst_stream)
            torch.index_select(src_rows[rows], 1, src_idx, out=src_stage)
            dst_stage.copy_(src_stage, non_blocking=True)  # on src_stream, fenced both ways with dst_stream
            dst_rows[rows].index_copy_(1, dst_idx, dst_stage)
        last_stream = pairs[(len(chunks) - 1) % 2][1]
        if len(pairs) > 1:  # the other pair's last scatter too
            last_stream.wait_stream(pairs[len(chunks) % 2][1])
        last = torch.cuda.Event(enable_timing=True)
        last.record(last_stream)
        return last

    def forget_source(self, worker_id: str) -> None:
        keys = [key for key in self._peers if key[0] == worker_id]
        if keys:
            for lane in self._lanes.values():  # no copy may read memory we unmap
                lane.synchronize()
            for key in keys:
                del self._peers[key]

    def close(self) -> None:
        for lane in self._lanes.values():
            lane.synchronize()
        self._peers.clear()
        self._lanes.clear()
        if _LOCAL.get(self.worker_id) is self:
            del _LOCAL[self.worker_id]


def time_copy(dst: torch.Tensor, src: torch.Tensor, repeats: int = 5, warmup: int = 2) -> float:
    """Median seconds of `dst.copy_(src)` between CUDA tensors, timed with events on the stream
    that runs it (the source GPU's current stream)."""
    stream = torch.cuda.current_stream(src.device)
    for _ in range(warmup):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize(src.device)
    torch.cuda.synchronize(dst.device)
    seconds = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        dst.copy_(src, non_blocking=True)
        end.record(stream)
        end.synchronize()
        seconds.append(start.elapsed_time(end) / 1e3)
    return statistics.median(seconds)


def peer_copy_ceiling(src_device: torch.device | str, dst_device: torch.device | str,
                      num_bytes: int) -> float:
    """Bytes per second of one contiguous `num_bytes` copy from `src_device` to `dst_device`
    (median of a few, after warm-up): what a pull of that size could reach at best."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device=src_device)
    dst = torch.empty(num_bytes, dtype=torch.uint8, device=dst_device)
    return num_bytes / time_copy(dst, src)
