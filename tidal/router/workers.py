"""The set of workers a router routes to: who they are, how loaded, what their KV caches hold.

Owns one `Worker` per live worker (a `WorkerClient` plus the router's own bookkeeping of what it
sent there), following `Discovery.watch` (added: connect; updated: a role another router flipped;
removed: end its requests, which then move), the event subscriber that brings the workers' load
reports and KV events, and the KV index those events keep (in order per worker; resynced from a
dump on any gap, new worker or restarted worker).

Lifecycle: `start()` (follow discovery and events) -> `wait_ready()` -> ... -> `close()`. Every
change that may give a queued request a worker (a worker connected, reported load, left, changed
role or drain state) calls `on_change`.

The bookkeeping (open requests, prefill tokens and requests without a token back yet, blocks of
open requests, admitted requests in flight) is updated by the dispatcher's plans at route, first
token and finish, and corrected upwards by load reports, so bursts that arrive between reports
spread out instead of all picking one worker. Each worker's queue length (`Worker.waiting`) and
decode rate (`wait_estimate.DecodeRate`, from its load reports) feed admission's wait estimate. `draining` takes a worker out of routing (`roles.RoleControl`,
or the worker's own `WorkerLeaving`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from tidal.config import FLEET_READY_TIMEOUT_S, CacheConfig
from tidal.curve import CurveKeys
from tidal.fleet_snapshot import WorkerSnapshot
from tidal.protocol import EngineStats, KVDump, KVEventBatch, LoadReport, WorkerInfo, WorkerLeaving
from tidal.router.index import KVIndex, WorkerEvents
from tidal.router.policy import WorkerView
from tidal.router.wait_estimate import DecodeRate, WorkerQueue
from tidal.runtime.discovery import Discovery
from tidal.runtime.events import EventSubscriber, cancel_and_wait
from tidal.runtime.worker_client import WorkerClient

logger = logging.getLogger(__name__)


@dataclass
class Worker:
    client: WorkerClient
    events: WorkerEvents = field(default_factory=WorkerEvents)
    open_requests: int = 0
    pending_prefill_tokens: int = 0
    pending_requests: int = 0  # requests it prefills for this router that have no token back yet
    active_blocks: int = 0  # blocks of the prompts of its open requests (the router's estimate)
    inflight: int = 0  # admitted requests that use it (as decode or as prefill worker)
    draining: bool = False  # routing skips it; a drain waits for inflight == 0
    decode_rate: DecodeRate = field(default_factory=DecodeRate)
    _sent_since_stats: int = 0  # requests this router sent it since `_stats_seen` came
    _stats_seen: EngineStats | None = None

    @property
    def routable(self) -> bool:
        return (self.client.is_healthy() and not self.draining and not self.client.leaving
                and not self.client.drained)

    @property
    def worker_id(self) -> str:
        return self.client.worker_id

    @property
    def pending(self) -> int:
        """Pending prefill tokens: the router's count, or the worker's report if that is higher
        (other routers send work there too)."""
        stats = self.client.stats()
        return max(self.pending_prefill_tokens, stats.num_pending_prefill_tokens if stats else 0)

    def sent(self, prompt_tokens: int) -> None:
        """A request it prefills (`prompt_tokens` to compute) until its first token comes back."""
        self._follow_stats()
        self._sent_since_stats += 1
        self.pending_requests += 1
        self.pending_prefill_tokens += prompt_tokens

    def first_token(self, prompt_tokens: int) -> None:
        self.pending_requests -= 1
        self.pending_prefill_tokens -= prompt_tokens

    @property
    def waiting(self) -> int:
        """Requests queued on the worker (not started): its last report's count plus what this router
        sent since that report and is still without a token; only when the report showed a queue,
        since a worker with free slots starts new requests at once."""
        stats = self._follow_stats()
        if stats is None or stats.num_waiting == 0:
            return 0
        return stats.num_waiting + min(self._sent_since_stats, self.pending_requests)

    def queue(self) -> WorkerQueue:
        return WorkerQueue(self.waiting, self.decode_rate.tokens_per_s)

    def _follow_stats(self) -> EngineStats | None:
        """The latest stats; a new one counts every request sent before it."""
        stats = self.client.stats()
        if stats is not self._stats_seen:
            self._stats_seen, self._sent_since_stats = stats, 0
        return stats

    def view(self, overlap_blocks: int) -> WorkerView:
        stats = self.client.stats()
        usage = stats.kv_blocks_used / stats.kv_blocks_total if stats and stats.kv_blocks_total else 0.0
        active = max(self.active_blocks, stats.kv_blocks_used if stats else 0)
        return WorkerView(self.worker_id, self.client.role, open_requests=self.open_requests,
                          pending_prefill_tokens=self.pending, overlap_blocks=overlap_blocks,
                          active_blocks=active, kv_usage=usage)

    def snapshot(self) -> WorkerSnapshot:
        ready = self.client.ready
        return WorkerSnapshot(self.worker_id, self.client.role, draining=self.draining,
                              pending_prefill_tokens=self.pending, block_size=ready.block_size if ready else 0,
                              stats=self.client.stats())


class WorkerSet:
    def __init__(self, discovery: Discovery, events: EventSubscriber, index: KVIndex, client_tag: str,
                 on_resync: Callable[[], None], on_change: Callable[[], None], keys: CurveKeys | None = None) -> None:
        """`client_tag` starts this router's socket ids at every worker (`WorkerClient`);
        `on_resync` counts a KV-index rebuild; `keys`: the clients dial with CURVE."""
        self.discovery = discovery
        self.events = events
        self.index = index
        self.client_tag = client_tag
        self.keys = keys
        self.on_resync = on_resync
        self.on_change = on_change
        self.workers: dict[str, Worker] = {}
        self.starting: dict[str, asyncio.Task] = {}  # worker id -> its connection under way
        self._tasks: list[asyncio.Task] = []
        self.block_size = CacheConfig.block_size  # until the first worker says its own
        self.max_model_len: int | None = None
        self.model_name: str | None = None

    # ---- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._follow_discovery()), asyncio.create_task(self._follow_events())]

    async def wait_ready(self, timeout_s: float = FLEET_READY_TIMEOUT_S) -> None:
        """Until every listed worker is connected (or gone); then at least one must decode."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            listed = {w.worker_id for w in self.discovery.list()}
            if listed <= set(self.workers) and not self.starting:
                if self.decoders():
                    return
                raise RuntimeError("no worker that can serve requests (role both or decode) is running")
            if loop.time() > deadline:
                raise TimeoutError("workers did not become ready in time")
            await asyncio.sleep(0.1)

    async def close(self) -> None:
        for task in [*self._tasks, *self.starting.values()]:
            await cancel_and_wait(task)
        for worker in list(self.workers.values()):
            await worker.client.close()
        self.workers.clear()
        self.events.close()

    # ---- membership ----------------------------------------------------------------------------
    async def _follow_discovery(self) -> None:
        async for event in self.discovery.watch():
            worker_id = event.worker.worker_id
            if event.kind == "added":
                self.starting[worker_id] = asyncio.create_task(self._connect(event.worker))
            elif event.kind == "updated":
                self._follow_role(event.worker)
            else:
                await cancel_and_wait(self.starting.pop(worker_id, None))
                worker = self.workers.pop(worker_id, None)
                self.index.remove_worker(worker_id)
                self.on_change()
                self.events.disconnect(worker_id)
                if worker is not None:
                    worker.client.mark_dead(event.reason or "removed from discovery")
                    await worker.client.close()

    def _follow_role(self, info: WorkerInfo) -> None:
        """A flip seen in discovery: ours (`set_role` already switched the client) or another
        router's (cluster mode: several frontends, one of which flipped the worker)."""
        worker = self.workers.get(info.worker_id)
        if worker is not None and worker.client.role != info.role:
            logger.info("worker %s is now %s (from discovery)", info.worker_id, info.role)
            worker.client.info = msgspec.structs.replace(worker.client.info, role=info.role)
            self.on_change()

    async def _connect(self, info: WorkerInfo) -> None:
        client = WorkerClient(info, client_tag=self.client_tag, keys=self.keys)
        try:
            await client.start()
        except Exception as exc:  # noqa: BLE001 - a worker that never came up is just not used
            logger.error("worker %s did not start: %s", info.worker_id, exc)
            await client.close()
            return
        finally:
            self.starting.pop(info.worker_id, None)
        worker = self.workers[info.worker_id] = Worker(client)
        client.on_dump = self.on_dump
        client.on_leaving = self._on_leaving
        client.on_change = self.on_change  # another router flipped or (un)drained it
        self.index.add_worker(info.worker_id)
        self.events.connect(info.worker_id, info.event_addr)
        self._resync(worker)
        self.block_size = client.ready.block_size
        self.model_name = self.model_name or client.model_name
        self.max_model_len = min(self.max_model_len or client.max_model_len, client.max_model_len)
        logger.info("worker %s (%s) ready", info.worker_id, info.role)

    def _on_leaving(self, msg: WorkerLeaving) -> None:
        """The worker got SIGTERM: no new requests go to it (its own ones finish or move)."""
        worker = self.workers.get(msg.worker_id)
        if worker is not None:
            worker.draining = True
            logger.info("worker %s is leaving: drained (%d requests in flight)", msg.worker_id, worker.inflight)
            self.on_change()

    # ---- events and the KV index ---------------------------------------------------------------
    async def _follow_events(self) -> None:
        async for _topic, event in self.events.events():
            worker = self.workers.get(event.worker_id)
            if worker is None:
                continue
            if isinstance(event, LoadReport):
                worker.client.update_stats(event.stats)
                worker.decode_rate.observe(event.stats, event.time)
                self.on_change()
            elif isinstance(event, KVEventBatch):
                self.on_kv_events(worker, event)

    def on_kv_events(self, worker: Worker, batch: KVEventBatch) -> None:
        if worker.events.accept(batch):
            self.index.apply(worker.worker_id, batch.events)
        elif worker.events.resyncing and not worker.events.dump_requested:
            logger.info("KV events of %s: gap or new instance at batch %d; resyncing", worker.worker_id,
                        batch.event_id)
            self._resync(worker)

    def _resync(self, worker: Worker) -> None:
        """Drop what the index holds for the worker and ask it for a dump."""
        worker.events.start_resync()
        worker.events.dump_requested = True
        self.index.clear_worker(worker.worker_id)
        self.on_resync()
        worker.client.request_dump()

    def on_dump(self, dump: KVDump) -> None:
        worker = self.workers.get(dump.worker_id)
        if worker is None:
            return
        worker.events.dump_requested = False
        later = worker.events.finish_resync(dump)
        self.index.clear_worker(worker.worker_id)
        if later is None:  # events after the dump left a gap: once more
            self._resync(worker)
            return
        self.index.store(worker.worker_id, (block_hash for block_hash, _ in dump.blocks))
        for batch in later:
            self.index.apply(worker.worker_id, batch.events)

    # ---- queries -------------------------------------------------------------------------------
    def decoders(self, exclude: str | None = None) -> list[Worker]:
        return [w for w in self.workers.values()
                if w.client.role in ("both", "decode") and w.routable and w.worker_id != exclude]

    def prefillers(self, exclude: str | None = None) -> list[Worker]:
        return [w for w in self.workers.values()
                if w.client.role == "prefill" and w.routable and w.worker_id != exclude]

    def has_room(self, max_pending_prefill_tokens: int) -> bool:
        """Some routable worker has fewer than `max_pending_prefill_tokens` waiting."""
        return any(w.pending < max_pending_prefill_tokens for w in self.decoders() + self.prefillers())

    def queues(self) -> list[WorkerQueue]:
        """Each routable decode-capable worker's queue and decode rate (admission's wait estimate)."""
        return [w.queue() for w in self.decoders()]

    def routable_by_role(self) -> dict[str, int]:
        roles: dict[str, int] = {"both": 0, "prefill": 0, "decode": 0}
        for worker in self.workers.values():
            if worker.routable:
                roles[worker.client.role] = roles.get(worker.client.role, 0) + 1
        return roles

    def stats(self) -> EngineStats | None:
        """Every worker's latest load report, summed (None before any)."""
        reports = [w.client.stats() for w in self.workers.values() if w.client.stats() is not None]
        if not reports:
            return None
        fields = EngineStats.__struct_fields__
        return EngineStats(**{f: sum(getattr(r, f) for r in reports) for f in fields})

    def snapshot(self) -> tuple[WorkerSnapshot, ...]:
        """Every connected worker, then every one discovery lists that is not connected yet."""
        workers = [w.snapshot() for w in self.workers.values()]
        workers += [WorkerSnapshot(info.worker_id, info.role, connected=False)
                    for info in self.discovery.list() if info.worker_id not in self.workers]
        return tuple(workers)

    def table(self) -> list[dict]:
        """Each worker's role and latest load report (the admin endpoint's answer)."""
        table = []
        for worker in self.workers.values():
            stats = worker.client.stats()
            table.append({"worker_id": worker.worker_id, "role": worker.client.role, "pid": worker.client.info.pid,
                          "healthy": worker.client.is_healthy(), "open_requests": worker.client.num_open_requests,
                          "draining": worker.draining, "leaving": worker.client.leaving,
                          "stats": msgspec.to_builtins(stats) if stats is not None else None})
        return table
