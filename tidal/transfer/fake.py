"""In-process KV transfer for unit tests: no files, sockets or threads.

Every `FakeKVTransfer` registers itself by worker id in a module-level registry when it is
created and leaves it on `close()`; `start_pull` looks the source up there and copies the blocks
at once, in the caller's thread. The returned transfer turns `done()` only after
`config.debug_delay_s`, so tests can watch requests wait for their KV; a delay past
`config.timeout_s` makes the pull fail at the timeout, copying nothing. Set `fail_next` to make the
next pull fail (the destination is then left untouched).
"""

from __future__ import annotations

import os
import time

import torch

from tidal.protocol import KVLayout, KVSourceInfo
from tidal.transfer.base import (KVTransferBackend, KVTransferConfig, KVTransferError, Transfer,
                                 copy_blocks, layout_bytes_per_block, torch_dtype)

_REGISTRY: dict[str, FakeKVTransfer] = {}


class FakeTransfer(Transfer):
    """Finished at creation; reports done once `ready_at` (monotonic) has passed."""

    def __init__(self, num_bytes: int, ready_at: float, error: KVTransferError | None) -> None:
        super().__init__(num_bytes)
        self.ready_at = ready_at
        self.error = error

    def done(self) -> bool:
        if self.finished is None and time.monotonic() >= self.ready_at:
            self.finished = time.monotonic()
        return self.finished is not None

    def result(self) -> None:
        if not self.done():
            raise KVTransferError("result() called before the transfer is done")
        if self.error is not None:
            raise self.error


class FakeKVTransfer(KVTransferBackend):
    name = "fake"

    def __init__(self, layout: KVLayout, device: torch.device, worker_id: str,
                 config: KVTransferConfig, fail_next: bool = False) -> None:
        super().__init__(layout, device, worker_id, config)
        self.fail_next = fail_next
        _REGISTRY[worker_id] = self

    def _allocate(self) -> torch.Tensor:
        return torch.zeros(self.layout.shape, dtype=torch_dtype(self.layout.dtype), device=self.device)

    def source_info(self) -> KVSourceInfo:
        return KVSourceInfo(backend=self.name, worker_id=self.worker_id, pid=os.getpid(), layout=self.layout)

    def start_pull(self, source: KVSourceInfo, src_block_ids: list[int],
                   dst_block_ids: list[int]) -> Transfer:
        self.check_source(source, src_block_ids, dst_block_ids)
        peer = _REGISTRY.get(source.worker_id)
        if peer is None or source.pid != os.getpid():
            raise KVTransferError(f"source worker {source.worker_id} is not in this process")
        error = None
        delay = self.config.debug_delay_s
        if self.fail_next:
            self.fail_next = False
            error = KVTransferError(f"injected failure pulling from {source.worker_id}")
        elif delay > self.config.timeout_s:  # as a real backend would: give up at the deadline
            delay = self.config.timeout_s
            error = KVTransferError(f"no KV from source {source.worker_id} within {delay:g} s")
        else:
            copy_blocks(peer.cache, self.cache, src_block_ids, dst_block_ids)
        num_bytes = len(src_block_ids) * layout_bytes_per_block(self.layout)
        return FakeTransfer(num_bytes, time.monotonic() + delay, error)

    def close(self) -> None:
        if _REGISTRY.get(self.worker_id) is self:
            del _REGISTRY[self.worker_id]
