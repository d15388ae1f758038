"""Discovery over etcd: workers registered under a lease, so a dead worker disappears by itself.

Keys: `/tidal/<namespace>/workers/<worker_id>`, each holding a JSON-encoded `WorkerInfo`. A
process that registers workers holds one lease (TTL `ClusterConfig.lease_ttl_s`) for all of them,
renewed every third of the TTL by a background task; a process that dies, hangs or is cut off
stops renewing and etcd deletes its keys when the lease runs out. A clean `close()` revokes the
lease, so its workers go at once.

Lifecycle: `start()` connects, lists the prefix and starts the background watch that keeps the
cache `list()` answers from (so `list()` is sync, as the router and planner call it); `register`
grants the lease and starts the keepalive on first use; `close()` stops both. `watch()` fans the
cache's changes out to any number of local watchers, like `LocalDiscovery`: the current workers
as `added`, then `added`/`updated`/`removed` as etcd reports them.

etcd outages are ridden out without a restart. While etcd is unreachable the cache keeps its
last view (a worker is not dropped because etcd is down). The watch loop retries: on reconnect
it lists the prefix again, emits `removed`/`added`/`updated` for every difference, and watches on
from the listing's revision. The keepalive loop retries too: once etcd answers it renews the old
lease if etcd still has it (a restarted etcd keeps its leases), else grants a new one, and puts
every record it owns again either way.

Invariant: the cache holds, per worker, the record with the highest etcd revision seen (local
writes are applied at once with their revision, so `register` then `list()` includes the worker;
the watch's later copy of the same write changes nothing).

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
from urllib.parse import urlsplit

import aetcd
import msgspec

from tidal.protocol import WorkerInfo
from tidal.runtime.cluster import ClusterConfig
from tidal.runtime.discovery import DiscoveryEvent, Watchers
from tidal.runtime.events import cancel_and_wait

logger = logging.getLogger(__name__)

RPC_TIMEOUT_S = 5
# gRPC backs off up to 120 s between reconnects by default; an etcd restart should be noticed in ~1 s.
GRPC_OPTIONS = {
    "grpc.initial_reconnect_backoff_ms": 250,
    "grpc.min_reconnect_backoff_ms": 250,
    "grpc.max_reconnect_backoff_ms": 1000,
    # Notice a peer that vanished without closing the connection; etcd refuses pings under 5 s apart.
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
}
REMOVED_ON_EXPIRY = "removed from etcd (unregistered, or its lease expired)"
REMOVED_ON_RELIST = "missing from etcd when its watch reconnected"


def parse_endpoint(url: str) -> tuple[str, int]:
    """`http://host:port` (or `host:port`) as (host, port)."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme != "http":
        raise ValueError(f"etcd endpoint {url!r}: only plain http endpoints are supported")
    return parts.hostname or "127.0.0.1", parts.port or 2379


class EtcdDiscovery:
    """`Discovery` over etcd (see the module docstring)."""

    def __init__(self, cluster: ClusterConfig, retry_s: float = 0.5, start_timeout_s: float = 10.0) -> None:
        if not cluster.etcd_endpoints:
            raise ValueError("EtcdDiscovery needs at least one etcd endpoint")
        self.cluster = cluster
        self.prefix = f"/tidal/{cluster.namespace}/workers/"
        self.retry_s = retry_s
        self.start_timeout_s = start_timeout_s
        self._endpoints = [parse_endpoint(url) for url in cluster.etcd_endpoints]
        self._endpoint = 0
        self._client = self._new_client()
        self._workers: dict[str, WorkerInfo] = {}
        self._revisions: dict[str, int] = {}  # worker id -> etcd revision of its cached record (or removal)
        self._etcd_revision = 0  # the latest revision etcd's listings and watch events have shown
        self._owned: dict[str, WorkerInfo] = {}  # registered by this process: put again after an outage
        self._lease_id: int | None = None
        self._deleting: set[str] = set()  # unregistered while etcd was unreachable: delete when back
        self._dirty = False  # etcd may lack an owned record (or hold a deleted one): write them all
        self._wake = asyncio.Event()  # a write failed: the keepalive loop checks the lease now
        self._watchers = Watchers()
        self._listed = asyncio.Event()
        self._watch_task: asyncio.Task | None = None
        self._keepalive_task: asyncio.Task | None = None
        self._encoder = msgspec.json.Encoder()
        self._decoder = msgspec.json.Decoder(WorkerInfo)

    # ---- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect, list the workers and follow them; idempotent. Raises TimeoutError if etcd does
        not answer within `start_timeout_s`."""
        if self._watch_task is None:
            self._watch_task = asyncio.create_task(self._follow())
        try:
            await asyncio.wait_for(self._listed.wait(), self.start_timeout_s)
        except TimeoutError:
            raise TimeoutError(f"etcd at {', '.join(self.cluster.etcd_endpoints)} did not answer in "
                               f"{self.start_timeout_s:g}s") from None

    async def close(self, revoke_lease: bool = True) -> None:
        """Stop following etcd. With `revoke_lease`, this process's workers disappear now; without,
        they disappear when the lease runs out (what a crash looks like to everyone else)."""
        await cancel_and_wait(self._keepalive_task)
        await cancel_and_wait(self._watch_task)
        self._keepalive_task = self._watch_task = None
        if revoke_lease and self._lease_id is not None:
            with contextlib.suppress(aetcd.ClientError, asyncio.TimeoutError):
                await self._client.revoke_lease(self._lease_id)
        self._lease_id = None
        await self._client.close()

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
        current = await self._client.get(key)
        if current is not None:
            result = await self._client.put(key, self._encoder.encode(worker), lease=current.lease or None)
            self._apply_put(worker, result.header.revision)

    async def unregister(self, worker_id: str, reason: str = "") -> None:
        """Delete the worker's record (any worker's, not only this process's). If etcd is
        unreachable, a process that holds a lease deletes it from its keepalive loop once etcd is
        back; one that holds none raises `aetcd.ClientError`."""
        self._owned.pop(worker_id, None)
        try:
            result = await self._client.delete(self._key(worker_id).encode())
        except aetcd.ClientError as exc:
            if self._keepalive_task is None:
                raise
            logger.warning("etcd delete of worker %s failed (%s); retried when etcd is back", worker_id, exc)
            self._deleting.add(worker_id)
            self._set_dirty()
            return
        if result is not None:
            self._apply_removal(worker_id, result.header.revision, reason or "unregistered")

    def list(self) -> list[WorkerInfo]:
        return list(self._workers.values())

    async def watch(self) -> AsyncIterator[DiscoveryEvent]:
        await self.start()
        async for event in self._watchers.watch(list(self._workers.values())):
            yield event

    # ---- the watch: etcd -> cache -> watchers ---------------------------------------------------
    async def _follow(self) -> None:
        failing = False
        while True:
            try:
                revision = await self._relist()
                self._listed.set()
                watch = await self._client.watch_prefix(self.prefix.encode(), start_revision=revision + 1)
                if failing:
                    logger.info("etcd watch of %s resumed at revision %d", self.prefix, revision)
                    failing = False
                async for event in watch:
                    self._on_event(event)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure: reconnect, list again, watch again
                if not failing:
                    logger.warning("etcd watch of %s failed (%s); retrying every %gs", self.prefix, exc,
                                   self.retry_s)
                    failing = True
                await asyncio.sleep(self.retry_s)
                self._next_endpoint()

    async def _relist(self) -> int:
        """Bring the cache to etcd's current state, notifying every difference; etcd's revision."""
        listing = await self._client.get_prefix(self.prefix.encode())
        revision = listing.header.revision
        if revision < self._etcd_revision:
            self._revisions.clear()  # a new etcd (its data lost): its revisions start again from 1
        self._etcd_revision = revision
        seen = set()
        for kv in listing:
            worker = self._decode(kv)
            if worker is not None:
                seen.add(worker.worker_id)
                self._apply_put(worker, kv.mod_revision)
        for worker_id in [w for w in self._workers if w not in seen]:
            self._apply_removal(worker_id, revision, REMOVED_ON_RELIST)
        # Removals older than the listing can't be contradicted by a late event any more.
        self._revisions = {w: r for w, r in self._revisions.items() if w in self._workers or r > revision}
        return revision

    def _on_event(self, event: aetcd.Event) -> None:
        self._etcd_revision = max(self._etcd_revision, event.kv.mod_revision)
        if event.kind == aetcd.EventKind.PUT:
            worker = self._decode(event.kv)
            if worker is not None:
                self._apply_put(worker, event.kv.mod_revision)
        else:
            worker_id = event.kv.key.decode()[len(self.prefix):]
            self._apply_removal(worker_id, event.kv.mod_revision, REMOVED_ON_EXPIRY)

    def _apply_put(self, worker: WorkerInfo, revision: int) -> None:
        worker_id = worker.worker_id
        if revision <= self._revisions.get(worker_id, 0):
            return  # already applied (our own write), or older than what the cache holds
        self._revisions[worker_id] = revision
        old = self._workers.get(worker_id)
        self._workers[worker_id] = worker
        if worker_id in self._owned:
            self._owned[worker_id] = worker  # flipped by another process: put this one after an outage
        if old is None:
            self._notify(DiscoveryEvent("added", worker))
        elif old != worker:
            self._notify(DiscoveryEvent("updated", worker))

    def _apply_removal(self, worker_id: str, revision: int, reason: str) -> None:
        if revision <= self._revisions.get(worker_id, 0):
            return
        self._revisions[worker_id] = revision
        worker = self._workers.pop(worker_id, None)
        if worker is not None:
            self._notify(DiscoveryEvent("removed", worker, reason))

    def _notify(self, event: DiscoveryEvent) -> None:
        self._watchers.notify(event)

    def _decode(self, kv) -> WorkerInfo | None:
        try:
            return self._decoder.decode(kv.value)
        except msgspec.DecodeError:
            logger.warning("etcd key %s: not a worker record; ignored", kv.key.decode(errors="replace"))
            return None

    # ---- the lease: this process's records stay while it lives -----------------------------------
    async def _keep_alive(self) -> None:
        interval_s = self.cluster.lease_ttl_s / 3
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
        reply = await self._client.refresh_lease(self._lease_id)
        return reply is not None and reply.TTL > 0

    async def _grant(self) -> None:
        lease = await self._client.lease(self.cluster.lease_ttl_s)
        self._lease_id = lease.id

    async def _write_all(self) -> None:
        """Put every owned record and delete every record whose delete failed."""
        for worker in list(self._owned.values()):
            await self._put(worker)
        for worker_id in list(self._deleting):
            result = await self._client.delete(self._key(worker_id).encode())
            self._deleting.discard(worker_id)
            if result is not None:
                self._apply_removal(worker_id, result.header.revision, "unregistered")
        self._dirty = False

    async def _put(self, worker: WorkerInfo) -> None:
        result = await self._client.put(self._key(worker.worker_id).encode(), self._encoder.encode(worker),
                                        lease=self._lease_id)
        if self._owned.get(worker.worker_id) is worker:  # not unregistered or updated meanwhile
            self._apply_put(worker, result.header.revision)

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

    # ---- connection --------------------------------------------------------------------------------
    def _key(self, worker_id: str) -> str:
        return f"{self.prefix}{worker_id}"

    def _new_client(self) -> aetcd.Client:
        host, port = self._endpoints[self._endpoint]
        return aetcd.Client(host=host, port=port, timeout=RPC_TIMEOUT_S, options=GRPC_OPTIONS)

    def _next_endpoint(self) -> None:
        """With several endpoints, move to the next one after a failure (gRPC retries a single one
        by itself)."""
        if len(self._endpoints) == 1:
            return
        old = self._client
        self._endpoint = (self._endpoint + 1) % len(self._endpoints)
        self._client = self._new_client()
        task = asyncio.create_task(old.close())
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
