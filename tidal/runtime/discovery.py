"""Discovery: which workers exist, their roles and addresses, and when they come and go.

`Discovery` is the interface callers use; `LocalDiscovery` is the embedded implementation (the
launcher's own table, in the frontend's process). `tidal.runtime.etcd_discovery.EtcdDiscovery`
sits beside it with the same interface (workers registered under a lease, so a dead worker
disappears when its lease lapses): `register`/`unregister` by the side that owns a worker,
`list`/`watch` by those that use it. `start()` before use and `close()` at the end (no-ops here);
`tidal.runtime.planes.make_discovery` picks the implementation.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from tidal.protocol import WorkerInfo


@dataclass(frozen=True)
class DiscoveryEvent:
    kind: str  # "added" | "removed" | "updated" (same worker, new record: a role flip)
    worker: WorkerInfo
    reason: str = ""  # removed: why (exited, stopped)


class Discovery(Protocol):
    async def start(self) -> None:
        """Ready to answer `list()` (a distributed implementation has listed its workers)."""

    async def close(self) -> None: ...

    async def register(self, worker: WorkerInfo) -> None: ...

    async def unregister(self, worker_id: str, reason: str = "") -> None: ...

    async def update(self, worker: WorkerInfo) -> None:
        """A registered worker's record changed (its role, after a flip)."""

    def list(self) -> list[WorkerInfo]: ...

    def watch(self) -> AsyncIterator[DiscoveryEvent]:
        """The current workers as `added` events, then every change as it happens."""


class Watchers:
    """The fan-out every discovery shares: each `watch()` gets its own queue, first the current
    workers as `added`, then every event `notify` is given."""

    def __init__(self) -> None:
        self._queues: list[asyncio.Queue[DiscoveryEvent]] = []

    async def watch(self, current: list[WorkerInfo]) -> AsyncIterator[DiscoveryEvent]:
        queue: asyncio.Queue[DiscoveryEvent] = asyncio.Queue()
        for worker in current:
            queue.put_nowait(DiscoveryEvent("added", worker))
        self._queues.append(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._queues.remove(queue)

    def notify(self, event: DiscoveryEvent) -> None:
        for queue in self._queues:
            queue.put_nowait(event)


class LocalDiscovery:
    """An in-memory table; watchers get an asyncio queue each."""

    def __init__(self) -> None:
        self._workers: dict[str, WorkerInfo] = {}
        self._watchers = Watchers()

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def register(self, worker: WorkerInfo) -> None:
        self._workers[worker.worker_id] = worker
        self._notify(DiscoveryEvent("added", worker))

    async def unregister(self, worker_id: str, reason: str = "") -> None:
        worker = self._workers.pop(worker_id, None)
        if worker is not None:
            self._notify(DiscoveryEvent("removed", worker, reason))

    async def update(self, worker: WorkerInfo) -> None:
        if worker.worker_id in self._workers:
            self._workers[worker.worker_id] = worker
            self._notify(DiscoveryEvent("updated", worker))

    def list(self) -> list[WorkerInfo]:
        return list(self._workers.values())

    async def watch(self) -> AsyncIterator[DiscoveryEvent]:
        async for event in self._watchers.watch(list(self._workers.values())):
            yield event

    def _notify(self, event: DiscoveryEvent) -> None:
        self._watchers.notify(event)
