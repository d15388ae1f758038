"""etcd's view of the workers, kept in a local cache: the connection, the watch and the cache.

`EtcdWorkerCache` lists `/tidal/<namespace>/workers/` and watches it from the listing's revision;
`list()` answers from the cache (sync, as the router and planner call it) and `watch()` fans its
changes out to any number of local watchers, like `LocalDiscovery`: the current workers as `added`,
then `added`/`updated`/`removed` as etcd reports them. `EtcdDiscovery` (the lease, the records this
process owns) writes through it.

etcd outages are ridden out without a restart. While etcd is unreachable the cache keeps its last
view (a worker is not dropped because etcd is down). The watch loop retries: on reconnect it lists
the prefix again, emits `removed`/`added`/`updated` for every difference, and watches on from the
listing's revision. With several endpoints, each failure moves to the next (`EtcdConnection`). With
`PlaneConfig.etcd_auth` the client authenticates as that user (the password read from its file,
`tidal.runtime.credentials`).

Invariant: the cache holds, per worker, the record with the highest etcd revision seen (local
writes are applied at once with their revision, so `register` then `list()` includes the worker;
the watch's later copy of the same write changes nothing).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import aetcd
import msgspec

from tidal.config import EtcdAuth
from tidal.protocol import WorkerInfo
from tidal.runtime.credentials import etcd_credentials
from tidal.runtime.discovery import DiscoveryEvent, Watchers

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


class EtcdConnection:
    """An etcd client over one of several endpoints; `client` changes when `next_endpoint()` moves on."""

    def __init__(self, endpoints: tuple[str, ...], auth: EtcdAuth | None = None) -> None:
        self._endpoints = [parse_endpoint(url) for url in endpoints]
        self._endpoint = 0
        self._auth = auth or EtcdAuth()
        self.client = self._new_client()

    def _new_client(self) -> aetcd.Client:
        host, port = self._endpoints[self._endpoint]
        return aetcd.Client(host=host, port=port, timeout=RPC_TIMEOUT_S, options=GRPC_OPTIONS,
                            **etcd_credentials(self._auth))

    def next_endpoint(self) -> None:
        """With several endpoints, move to the next one after a failure (gRPC retries a single one
        by itself)."""
        if len(self._endpoints) == 1:
            return
        old = self.client
        self._endpoint = (self._endpoint + 1) % len(self._endpoints)
        self.client = self._new_client()
        task = asyncio.create_task(old.close())
        task.add_done_callback(lambda t: t.cancelled() or t.exception())


class EtcdWorkerCache:
    """The workers under `prefix`, as etcd last showed them (see the module docstring). `owned`: the
    records this process registered; a newer copy written by another process (a flip) replaces them."""

    def __init__(self, etcd: EtcdConnection, prefix: str, owned: dict[str, WorkerInfo], retry_s: float) -> None:
        self.etcd = etcd
        self.prefix = prefix
        self.owned = owned
        self.retry_s = retry_s
        self.workers: dict[str, WorkerInfo] = {}
        self._revisions: dict[str, int] = {}  # worker id -> etcd revision of its cached record (or removal)
        self._etcd_revision = 0  # the latest revision etcd's listings and watch events have shown
        self._watchers = Watchers()
        self.listed = asyncio.Event()
        self._decoder = msgspec.json.Decoder(WorkerInfo)

    def list(self) -> list[WorkerInfo]:
        return list(self.workers.values())

    async def watch(self) -> AsyncIterator[DiscoveryEvent]:
        async for event in self._watchers.watch(list(self.workers.values())):
            yield event

    async def follow(self) -> None:
        failing = False
        while True:
            try:
                revision = await self._relist()
                self.listed.set()
                watch = await self.etcd.client.watch_prefix(self.prefix.encode(), start_revision=revision + 1)
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
                self.etcd.next_endpoint()

    async def _relist(self) -> int:
        """Bring the cache to etcd's current state, notifying every difference; etcd's revision."""
        listing = await self.etcd.client.get_prefix(self.prefix.encode())
        revision = listing.header.revision
        if revision < self._etcd_revision:
            self._revisions.clear()  # a new etcd (its data lost): its revisions start again from 1
        self._etcd_revision = revision
        seen = set()
        for kv in listing:
            worker = self._decode(kv)
            if worker is not None:
                seen.add(worker.worker_id)
                self.apply_put(worker, kv.mod_revision)
        for worker_id in [w for w in self.workers if w not in seen]:
            self.apply_removal(worker_id, revision, REMOVED_ON_RELIST)
        # Removals older than the listing can't be contradicted by a late event any more.
        self._revisions = {w: r for w, r in self._revisions.items() if w in self.workers or r > revision}
        return revision

    def _on_event(self, event: aetcd.Event) -> None:
        self._etcd_revision = max(self._etcd_revision, event.kv.mod_revision)
        if event.kind == aetcd.EventKind.PUT:
            worker = self._decode(event.kv)
            if worker is not None:
                self.apply_put(worker, event.kv.mod_revision)
        else:
            worker_id = event.kv.key.decode()[len(self.prefix):]
            self.apply_removal(worker_id, event.kv.mod_revision, REMOVED_ON_EXPIRY)

    def apply_put(self, worker: WorkerInfo, revision: int) -> None:
        worker_id = worker.worker_id
        if revision <= self._revisions.get(worker_id, 0):
            return  # already applied (our own write), or older than what the cache holds
        self._revisions[worker_id] = revision
        old = self.workers.get(worker_id)
        self.workers[worker_id] = worker
        if worker_id in self.owned:
            self.owned[worker_id] = worker  # flipped by another process: put this one after an outage
        if old is None:
            self._watchers.notify(DiscoveryEvent("added", worker))
        elif old != worker:
            self._watchers.notify(DiscoveryEvent("updated", worker))

    def apply_removal(self, worker_id: str, revision: int, reason: str) -> None:
        if revision <= self._revisions.get(worker_id, 0):
            return
        self._revisions[worker_id] = revision
        worker = self.workers.pop(worker_id, None)
        if worker is not None:
            self._watchers.notify(DiscoveryEvent("removed", worker, reason))

    def _decode(self, kv) -> WorkerInfo | None:
        try:
            return self._decoder.decode(kv.value)
        except msgspec.DecodeError:
            logger.warning("etcd key %s: not a worker record; ignored", kv.key.decode(errors="replace"))
            return None
