"""The launcher's discovery, relayed to the frontend processes of one machine.

`tidal serve` with several API servers keeps one `LocalDiscovery` in the launcher process (it starts
and watches the workers) and runs the HTTP frontends in processes of their own. `DiscoveryRelay`
(launcher side) serves that discovery on a ZMQ ROUTER socket: a `RelayDiscovery` (frontend side)
sends `DiscoverySubscribe`, gets a `DiscoverySnapshot` of every worker, then each `DiscoveryChange`
in order, for as long as it lives. `RelayDiscovery` has the `Discovery` interface, read-only: the
frontend processes follow the launcher's table, they never write it.

Invariants: a subscriber sees every change after its snapshot (the relay answers a subscription
and forwards changes on one event loop, so nothing falls between); a change it already has in
its snapshot may come once more, and `RelayDiscovery` applies changes idempotently. A relay that
stops answering (the launcher died) ends nothing here: the frontend process's own parent watch
stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import msgspec
import zmq
import zmq.asyncio

from tidal.protocol import DiscoveryChange, DiscoverySnapshot, DiscoverySubscribe, RelayMessage, WorkerInfo
from tidal.runtime.discovery import Discovery, DiscoveryEvent, Watchers

logger = logging.getLogger(__name__)

SUBSCRIBE_TIMEOUT_S = 30.0


class DiscoveryRelay:
    """Serves `discovery` to frontend processes at `address` (an ipc:// or tcp:// endpoint)."""

    def __init__(self, discovery: Discovery, address: str) -> None:
        self.discovery = discovery
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(address)
        self.address = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._subscribers: set[bytes] = set()
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(RelayMessage)
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._serve()), asyncio.create_task(self._forward())]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._sock.close(linger=0)
        self._ctx.term()

    async def _serve(self) -> None:
        while True:
            identity, raw = await self._sock.recv_multipart()
            try:
                msg = self._decoder.decode(raw)
            except msgspec.DecodeError:
                continue
            if isinstance(msg, DiscoverySubscribe):
                snapshot = DiscoverySnapshot(workers=self.discovery.list())
                self._subscribers.add(identity)
                await self._sock.send_multipart([identity, self._encoder.encode(snapshot)])
                logger.debug("frontend %s follows discovery (%d workers)", msg.frontend_id, len(snapshot.workers))

    async def _forward(self) -> None:
        async for event in self.discovery.watch():
            raw = self._encoder.encode(DiscoveryChange(kind=event.kind, worker=event.worker, reason=event.reason))
            for identity in list(self._subscribers):
                try:
                    await self._sock.send_multipart([identity, raw], zmq.NOBLOCK)
                except zmq.ZMQError:  # that frontend process is gone
                    self._subscribers.discard(identity)

    def forget(self, identity_prefix: bytes) -> None:
        """Stop sending to the subscribers of a frontend process that exited."""
        self._subscribers = {s for s in self._subscribers if not s.startswith(identity_prefix)}


class RelayDiscovery:
    """A read-only `Discovery` fed by a `DiscoveryRelay`."""

    def __init__(self, address: str, frontend_id: str) -> None:
        self.address = address
        self.frontend_id = frontend_id
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.IDENTITY, f"{frontend_id}:relay".encode())
        self._workers: dict[str, WorkerInfo] = {}
        self._watchers = Watchers()
        self._decoder = msgspec.msgpack.Decoder(RelayMessage)
        self._reader: asyncio.Task | None = None

    async def start(self, timeout_s: float = SUBSCRIBE_TIMEOUT_S) -> None:
        self._sock.connect(self.address)
        await self._sock.send(msgspec.msgpack.encode(DiscoverySubscribe(frontend_id=self.frontend_id)))
        if not await self._sock.poll(timeout_s * 1000):
            raise TimeoutError(f"the discovery relay at {self.address} did not answer in {timeout_s:g}s")
        snapshot = self._decoder.decode(await self._sock.recv())
        if not isinstance(snapshot, DiscoverySnapshot):
            raise RuntimeError(f"the discovery relay answered {type(snapshot).__name__}, not a snapshot")
        for worker in snapshot.workers:
            self._workers[worker.worker_id] = worker
        self._reader = asyncio.create_task(self._follow())

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        self._sock.close(linger=0)
        self._ctx.term()

    async def _follow(self) -> None:
        while True:
            msg = self._decoder.decode(await self._sock.recv())
            if isinstance(msg, DiscoveryChange):
                self._apply(msg)

    def _apply(self, change: DiscoveryChange) -> None:
        worker_id = change.worker.worker_id
        known = self._workers.get(worker_id)
        if change.kind == "removed":
            if self._workers.pop(worker_id, None) is not None:
                self._watchers.notify(DiscoveryEvent("removed", change.worker, change.reason))
        elif known is None:
            self._workers[worker_id] = change.worker
            self._watchers.notify(DiscoveryEvent("added", change.worker))
        elif known != change.worker:
            self._workers[worker_id] = change.worker
            self._watchers.notify(DiscoveryEvent("updated", change.worker))

    async def register(self, worker: WorkerInfo) -> None:
        raise NotImplementedError("frontend processes follow the launcher's discovery; they don't write it")

    async def unregister(self, worker_id: str, reason: str = "") -> None:
        raise NotImplementedError("frontend processes follow the launcher's discovery; they don't write it")

    async def update(self, worker: WorkerInfo) -> None:
        raise NotImplementedError("frontend processes follow the launcher's discovery; they don't write it")

    def list(self) -> list[WorkerInfo]:
        return list(self._workers.values())

    async def watch(self) -> AsyncIterator[DiscoveryEvent]:
        async for event in self._watchers.watch(list(self._workers.values())):
            yield event
