"""Shared-memory KV transfer between CPU workers of one host.

Each backend owns one file, `<scratch_dir>/kv-<worker_id>-<pid>.bin`, exactly the size of its
cache, mapped shared (`torch.from_file`): that mapping *is* the worker's KV cache. A peer pulls by
mapping the source's file too (once per source worker and pid, kept until `forget_source` or
`close`) and copying the blocks on this backend's single worker thread, so `start_pull` never
blocks the engine; torch's copies release the GIL.

A pull fails when the source process is gone at its start or at its end (a mapping outlives its
process, so the check after the copy is what tells a finished copy from a copy of a dying worker's
memory), or when it has not finished within `timeout_s`. `close()` stops the thread, drops the
mappings and unlinks this backend's file; the file of a killed worker stays behind for the
launcher, which owns `scratch_dir`, to sweep.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import torch

from tidal.protocol import KVLayout, KVSourceInfo
from tidal.transfer.base import (KVTransferBackend, KVTransferConfig, KVTransferError, ThreadTransfer,
                                 copy_blocks, layout_bytes_per_block, process_alive, torch_dtype)


def _map(path: Path, layout: KVLayout) -> torch.Tensor:
    """The file at `path` as a cache tensor of `layout.shape`, shared with every other mapping."""
    numel = math.prod(layout.shape)
    mapped = torch.from_file(str(path), shared=True, size=numel, dtype=torch_dtype(layout.dtype))
    return mapped.view(layout.shape)


def _file_bytes(layout: KVLayout) -> int:
    return layout.num_blocks * layout_bytes_per_block(layout)


class ShmKVTransfer(KVTransferBackend):
    name = "shm"

    def __init__(self, layout: KVLayout, device: torch.device, worker_id: str,
                 config: KVTransferConfig) -> None:
        if torch.device(device).type != "cpu":
            raise ValueError(f"the shm KV transfer backend serves CPU caches, not {device}")
        safe_id = re.sub(r"[^A-Za-z0-9_.-]", "_", worker_id)
        self.path = Path(config.scratch_dir or tempfile.gettempdir()) / f"kv-{safe_id}-{os.getpid()}.bin"
        self._sources: dict[tuple[str, int], torch.Tensor] = {}  # (worker_id, pid) -> mapped cache
        self._closing = threading.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"kv-shm-{worker_id}")
        super().__init__(layout, device, worker_id, config)

    def _allocate(self) -> torch.Tensor:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, _file_bytes(self.layout))  # a fresh (truncated) file reads as zeros
        finally:
            os.close(fd)
        return _map(self.path, self.layout)

    def source_info(self) -> KVSourceInfo:
        return KVSourceInfo(backend=self.name, worker_id=self.worker_id, pid=os.getpid(),
                            layout=self.layout, address=str(self.path))

    def start_pull(self, source: KVSourceInfo, src_block_ids: list[int],
                   dst_block_ids: list[int]) -> ThreadTransfer:
        self.check_source(source, src_block_ids, dst_block_ids)
        if self._closing.is_set():
            raise KVTransferError("the KV transfer backend is closed")
        if not process_alive(source.pid):
            raise KVTransferError(f"source worker {source.worker_id} (pid {source.pid}) is not running")
        src_cache = self._open(source)
        transfer = ThreadTransfer(len(src_block_ids) * layout_bytes_per_block(self.layout), source,
                                  self.config.timeout_s)
        job = partial(self._copy, transfer, src_cache, list(src_block_ids), list(dst_block_ids))
        self._executor.submit(transfer.run, job)
        return transfer

    def _open(self, source: KVSourceInfo) -> torch.Tensor:
        key = (source.worker_id, source.pid)
        if key not in self._sources:
            path = Path(source.address)
            try:
                size = path.stat().st_size
            except OSError as exc:
                raise KVTransferError(f"cannot open the KV file of {source.worker_id}: {exc}") from exc
            if size != _file_bytes(source.layout):
                raise KVTransferError(f"KV file {path} holds {size} bytes, its layout says "
                                      f"{_file_bytes(source.layout)}")
            self._sources[key] = _map(path, source.layout)
        return self._sources[key]

    def _copy(self, transfer: ThreadTransfer, src_cache: torch.Tensor, src_block_ids: list[int],
              dst_block_ids: list[int]) -> None:
        """Runs on the worker thread."""
        if self._closing.wait(self.config.debug_delay_s):
            raise KVTransferError("the KV transfer backend closed during the pull")
        if not transfer.claim():
            return  # timed out while waiting
        copy_blocks(src_cache, self.cache, src_block_ids, dst_block_ids)
        source = transfer.source
        if not process_alive(source.pid):
            raise KVTransferError(f"source worker {source.worker_id} (pid {source.pid}) "
                                  "died during the transfer")

    def forget_source(self, worker_id: str) -> None:
        for key in [key for key in self._sources if key[0] == worker_id]:
            del self._sources[key]

    def close(self) -> None:
        self._closing.set()
        self._executor.shutdown(wait=True)
        self._sources.clear()
        self.path.unlink(missing_ok=True)
