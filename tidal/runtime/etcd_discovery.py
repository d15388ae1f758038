"""Discovery over etcd: workers registered under a lease, so a dead worker disappears by itself.

Keys: `/tidal/<namespace>/workers/<worker_id>`, each holding a JSON-encoded `WorkerInfo`. A
process that registers workers holds one lease (TTL `PlaneConfig.lease_ttl_s`) for all of them,
renewed every third of the TTL by a background task; a process that dies, hangs or is cut off
stops renewing and etcd deletes its keys when the lease runs out. A clean `close()` revokes the
lease, so its workers go at once. What every process sees (the listing, the watch, the cache that
`list()` answers from) is `tidal.runtime.etcd_cache.EtcdWorkerCache`.

Lifecycle: `start()` connects, lists the prefix and starts the cache's background watch;
`register` grants the lease and starts the keepalive on first use; `close()` stops both.

etcd outages are ridden out without a restart: the keepalive loop retries; once etcd answers it
renews the old lease if etcd still has it (a restarted etcd keeps its leases), else grants a new
one, and puts every record it owns again either way.

Client: `aetcd` (a maintained asyncio etcd v3 gRPC client, pure-Python wheel). It requires a
recent grpcio (> 1.66) and protobuf 4 to 7, so it installs beside current packages; `etcetra`,
the other candidate, pins grpcio==1.62.2, grpcio-tools and protobuf 4.25, which conflict with
them. It speaks the v3 API that etcd 3.4 and later serve.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import aetcd
import msgspec

from tidal.config import PlaneConfig
from tidal.protocol import WorkerInfo
from tidal.runtime.discovery import DiscoveryEvent
from tidal.runtime.etcd_cache import EtcdConnection, EtcdWorkerCache
from tidal.runtime.events import cancel_and_wait

logger = logging.getLogger(__name__)


class EtcdDiscovery:
    """`Discovery` over etcd (see the module docstring)."""

    def __init__(self, planes: PlaneConfig, retry_s: float = 0.5, start_timeout_s: float = 10.0) -> None:
        if not planes.etcd_endpoints:
            raise ValueError("EtcdDiscovery needs at least one etcd endpoint")
        self.planes = planes
        self.prefix = f"/tidal/{planes.namespace}/workers/"
        self.retry_s = retry_s
        self.start_timeout_s = start_timeout_s
        self.etcd = EtcdConnection(planes.etcd_endpoints, planes.etcd_auth)
        self._owned: dict[str, WorkerInfo] = {}  # registered by this process: put again after an outage
        self.cache = EtcdWorkerCache(self.etcd, self.prefix, self._owned, retry_s)
        self._lease_id: int | None = None
        self._deleting: set[str] = set()  # unregistered while etcd was unreachable: delete when back
        self._dirty = False  # etcd may lack an owned record (or hold a deleted one): write them all
        self._wake = asyncio.Event()  # a write failed: the keepalive loop checks the lease now
        self._watch_task: asyncio.Task | None = None
        self._keepalive_task: asyncio.Task | None = None
        self._encoder = msgspec.json.Encoder()

    # ---- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect, list the workers and follow them; idempotent. Raises TimeoutError if etcd does
        not answer within `start_timeout_s`."""
        if self._watch_task is None:
            self._watch_task = asyncio.create_task(self.cache.follow())
        try:
            await asyncio.wait_for(self.cache.listed.wait(), self.start_timeout_s)
        except TimeoutError:
            raise TimeoutError(f"etcd at {', '.join(self.planes.etcd_endpoints)} did not answer in "
                               f"{self.start_timeout_s:g}s") from None

    async def close(self, revoke_lease: bool = True) -> None:
        """Stop following etcd. With `revoke_lease`, this process's workers disappear now; without,
        they disappear when the lease runs out (what a crash looks like to everyone else)."""
        await cancel_and_wait(self._keepalive_task)
        await cancel_and_wait(self._watch_task)
        self._keepalive_task = self._watch_task = None
        if revoke_lease and self._lease_id is not None:
            with contextlib.suppress(aetcd.ClientError, asyncio.TimeoutError):
                await self.etcd.client.revoke_lease(self._lease_id)
        self._lease_id = None
        await self.etcd.client.close()

    # ---- Discovery -----------------------------------------------------------------------------
    async def register(self, worker: WorkerInfo) -> None:
        """Write the worker's record under this process's lease. If etcd is unreachable the record
        is written by the keepalive loop once it is back."""
        await self.start()
        self._owned[worker.worker_id] = worker
        self._deleting.discard(worker.worker_id)
        if self._keepalive_task is None:
            with contextlib.suppress(aetcd.ClientError):
                await self._grant()
            self._keepalive_task = asyncio.create_task(self._keep_alive())
        await self._put_or_defer(worker)

    async def update(self, worker: WorkerInfo) -> None:
        """Rewrite a registered worker's record. Another process's worker keeps that process's
        lease; a worker etcd doesn't hold is not written."""
        if worker.worker_id in self._owned:
            self._owned[worker.worker_id] = worker
            await self._put_or_defer(worker)
            return
        key = self._key(worker.worker_id).encode()
        current = await self.etcd.client.get(key)
        if current is not None:
            result = await self.etcd.client.put(key, self._encoder.encode(worker), lease=current.lease or None)
            self.cache.apply_put(worker, result.header.revision)

    async def unregister(self, worker_id: str, reason: str = "") -> None:
        """Delete the worker's record (any worker's, not only this process's). If etcd is
        unreachable, a process that holds a lease deletes it from its keepalive loop once etcd is
        back; one that holds none raises `aetcd.ClientError`."""
        self._owned.pop(worker_id, None)
        try:
            result = await self.etcd.client.delete(self._key(worker_id).encode())
        except aetcd.ClientError as exc:
            if self._keepalive_task is None:
                raise
            logger.warning("etcd delete of worker %s failed (%s); retried when etcd is back", worker_id, exc)
            self._deleting.add(worker_id)
            self._set_dirty()
            return
        if result is not None:
            self.cache.apply_removal(worker_id, result.header.revision, reason or "unregistered")

    def list(self) -> list[WorkerInfo]:
        return self.cache.list()

    async def watch(self) -> AsyncIterator[DiscoveryEvent]:
        await self.start()
        async for event in self.cache.watch():
            yield event

    # ---- the lease: this process's records stay while it lives -----------------------------------
    async def _keep_alive(self) -> None:
        interval_s = self.planes.lease_ttl_s / 3
        failing = False
        while True:
            try:
                if self._lease_id is None or not await self._renew():
                    await self._grant()
                    self._dirty = True  # a new lease: put every record under it
                if self._dirty:
                    await self._write_all()
                if failing:
                    logger.info("etcd lease %x renewed; %d worker(s) registered", self._lease_id,
                                len(self._owned))
                    failing = False
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), interval_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - etcd down or unreachable: retry until it is back
                if not failing:
                    logger.warning("etcd lease keepalive failed (%s); retrying every %gs", exc, self.retry_s)
                    failing = True
                self._dirty = True  # etcd may have lost the records (a new etcd, or a lease that ran out)
                await asyncio.sleep(self.retry_s)

    async def _renew(self) -> bool:
        """True if etcd still has the lease (and has reset its TTL)."""
        reply = await self.etcd.client.refresh_lease(self._lease_id)
        return reply is not None and reply.TTL > 0

    async def _grant(self) -> None:
        lease = await self.etcd.client.lease(self.planes.lease_ttl_s)
        self._lease_id = lease.id

    async def _write_all(self) -> None:
        """Put every owned record and delete every record whose delete failed."""
        for worker in list(self._owned.values()):
            await self._put(worker)
        for worker_id in list(self._deleting):
            result = await self.etcd.client.delete(self._key(worker_id).encode())
            self._deleting.discard(worker_id)
            if result is not None:
                self.cache.apply_removal(worker_id, result.header.revision, "unregistered")
        self._dirty = False

    async def _put(self, worker: WorkerInfo) -> None:
        result = await self.etcd.client.put(self._key(worker.worker_id).encode(), self._encoder.encode(worker),
                                        lease=self._lease_id)
        if self._owned.get(worker.worker_id) is worker:  # not unregistered or updated meanwhile
            self.cache.apply_put(worker, result.header.revision)

    async def _put_or_defer(self, worker: WorkerInfo) -> None:
        if self._lease_id is None:
            self._set_dirty()  # the keepalive loop grants a lease, then puts every record
            return
        try:
            await self._put(worker)
        except aetcd.ClientError as exc:
            logger.warning("etcd put of worker %s failed (%s); retried when etcd is back", worker.worker_id,
                           exc)
            self._set_dirty()

    def _set_dirty(self) -> None:
        self._dirty = True
        self._wake.set()

    def _key(self, worker_id: str) -> str:
        return f"{self.prefix}{worker_id}"
