"""The router service: the frontend's `EngineClient` over every worker that discovery lists.

Owns one `WorkerClient` per live worker (following `Discovery.watch`), the event subscriber
that brings their load reports and KV events, the KV index (kept in order per worker, resynced
from a dump on any gap, new worker or restarted worker), the session table, the admission queue,
and its own bookkeeping of what it sent where (open requests, prefill tokens without a token back
yet, blocks of open requests), updated at route, first token and finish and corrected upwards by
load reports, so bursts that arrive between reports spread out instead of all picking one worker.

One request: `admit` (queue while every worker is over its pending-prefill limit; 503 with
Retry-After when the queue is full or the wait passes its deadline), then `generate`:
1. pick the decode-capable worker (`both` or `decode`): the session's worker if it has one and
   is not overloaded, else by the routing policy (`kv` weighs the prompt's uncached blocks there
   plus its pending prefill against its active blocks);
2. if prefill workers are alive, decide local or remote prefill (conditional disaggregation)
   from the prompt's uncached length on that worker and the prefill queues;
3. local: the request runs there whole. Remote: the chosen prefill worker runs it with
   max_tokens=1 and `hold_kv`; its first token streams to the client at once; the decode worker
   gets the request with the prefill's `KVTransferParams`, pulls the KV, releases the prefill
   worker's blocks and streams the rest. A prefill worker that dies before its token makes the
   request fall back to a local prefill.
4. migration (`migration.py`): when the worker streaming the request dies or leaves, or the decode
   worker's KV pull fails (its prefill worker died), the request is planned again, without that
   worker, as its prompt plus the tokens streamed so far, and the stream goes on from the new
   worker; up to `max_migrations` times, then the client gets the error.
Blocks held on a prefill worker are released on every path that does not hand them to a
decode worker (stop at the first token, client gone, decode worker gone).

A worker that leaves (SIGTERM: `WorkerLeaving`) is drained at once: nothing new goes to it; what it
has finishes there within its grace period or moves when it exits.

Drain (the planner's actuators): `drain(worker_id)` takes a worker out of routing (as decode and as
prefill target), waits until no admitted request uses it (a prefill worker counts until the decode
side has its KV) and the worker itself confirms it holds nothing (it accepts `SetRole` of its own
role only when idle); `undrain` puts it back; `set_role` flips a drained worker. Every finished
request's latencies and lengths go to `request_log` (the planner reads it).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import random
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import msgspec
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

from tidal.frontend.engine_client import EngineDeadError, OverloadedError
from tidal.hashing import ROOT_PARENT_HASH, block_hashes
from tidal.protocol import (KV_TRANSFER_FAILED, AddRequest, EngineStats, KVDump, KVEventBatch, LoadReport, TokenDelta,
                            WorkerLeaving)
from tidal.router.index import KVIndex, WorkerEvents
from tidal.router.migration import REASONS as MIGRATION_REASONS, WorkerLost, resume_request
from tidal.router.request_log import RequestLog
from tidal.router.policy import (POLICIES, DisaggPolicy, KVWeights, WorkerView, choose_prefill_worker,
                                 choose_worker, decide_prefill)
from tidal.runtime.discovery import Discovery
from tidal.runtime.events import EventSubscriber, ZmqEventSubscriber, cancel_and_wait
from tidal.worker.client import RoleChangeError, WorkerClient

logger = logging.getLogger(__name__)

STAGE_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                   30.0, 60.0)


DECISION_BUCKETS_S = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1)
OVERLAP_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
SESSIONS_MAX = 100_000
PLAN_TTL_S = 60.0  # an admitted request whose stream never starts gives its place back after this
DRAIN_POLL_S = 0.01


@dataclass(frozen=True)
class RouterConfig:
    policy: str = "round_robin"
    """How a decode (or aggregated) worker is chosen: round_robin, random, least_loaded, kv."""
    weights: KVWeights = field(default_factory=KVWeights)
    """kv policy weights (a request's `routing` options override them)."""
    disagg: DisaggPolicy = field(default_factory=DisaggPolicy)
    max_pending_prefill_tokens: int = 32768
    """A worker with this many prompt tokens waiting for their first token is full; when all are,
    requests wait in the router's queue."""
    max_queue: int = 1024
    """Requests allowed to wait; more are refused (503, Retry-After)."""
    queue_timeout_s: float = 30.0
    """A request that waits longer is refused (503, Retry-After)."""
    max_migrations: int = 3
    """Times one request may move to another worker when its worker goes away mid-stream; past
    that the client gets the error."""
    seed: int = 0


@dataclass
class _Worker:
    client: WorkerClient
    events: WorkerEvents = field(default_factory=WorkerEvents)
    open_requests: int = 0
    pending_prefill_tokens: int = 0
    active_blocks: int = 0  # blocks of the prompts of its open requests (the router's estimate)
    inflight: int = 0  # admitted requests that use it (as decode or as prefill worker)
    draining: bool = False  # routing skips it; a drain waits for inflight == 0

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

    def view(self, overlap_blocks: int) -> WorkerView:
        stats = self.client.stats()
        usage = stats.kv_blocks_used / stats.kv_blocks_total if stats and stats.kv_blocks_total else 0.0
        active = max(self.active_blocks, stats.kv_blocks_used if stats else 0)
        return WorkerView(self.worker_id, self.client.role, open_requests=self.open_requests,
                          pending_prefill_tokens=self.pending, overlap_blocks=overlap_blocks,
                          active_blocks=active, kv_usage=usage)


@dataclass
class _Plan:
    """An admitted request's route, with the bookkeeping it added (removed when it ends)."""

    decode: _Worker
    prefill: _Worker | None
    hashes: list[int]  # the prompt's full blocks
    uncached: int  # prompt tokens the prefilling worker computes
    blocks: int
    created: float
    arrived: float = 0.0  # when the router first saw it (before any queueing)
    pending_on: _Worker | None = None
    pending_tokens: int = 0
    prefill_held: bool = False  # counted in the prefill worker's inflight

    def prefill_done(self) -> None:
        """The decode worker has the KV (or the prefill worker is out of the picture)."""
        if self.prefill_held:
            self.prefill_held = False
            self.prefill.inflight -= 1

    def first_token(self) -> None:
        if self.pending_on is not None:
            self.pending_on.pending_prefill_tokens -= self.pending_tokens
            self.pending_on = None

    def release(self) -> None:
        self.first_token()
        self.prefill_done()
        self.decode.inflight -= 1
        self.decode.open_requests -= 1
        self.decode.active_blocks -= self.blocks


class Router:
    def __init__(self, discovery: Discovery, config: RouterConfig = RouterConfig(),
                 events: EventSubscriber | None = None, client_tag: str = ""):
        """`events`: the event plane's subscriber (`tidal.runtime.planes.make_event_subscriber`, with
        topics `load` and `kv`); None: ZMQ, connecting to each worker's `event_addr`. `client_tag`
        starts this replica's socket ids at every worker (`WorkerClient`)."""
        if config.policy not in POLICIES:
            raise ValueError(f"unknown routing policy {config.policy!r}; choose one of {', '.join(POLICIES)}")
        self.discovery = discovery
        self.config = config
        self.workers: dict[str, _Worker] = {}
        self.index = KVIndex()
        self.events = events if events is not None else ZmqEventSubscriber(("load", "kv"))
        self.sessions: OrderedDict[str, str] = OrderedDict()  # session id -> worker id
        self.client_tag = client_tag
        self.on_session_pinned: Callable[[str, str], None] | None = None  # tells the other replicas
        self.replica_queue_depth: Callable[[], int] | None = None  # what the API servers' routers queue
        self._plans: dict[str, _Plan] = {}
        self._queue: list = []  # heap of [-priority, seq, request, future]
        self._seq = itertools.count()
        self._starting: dict[str, asyncio.Task] = {}
        self._tasks: list[asyncio.Task] = []
        self._counter = 0
        self._rng = random.Random(config.seed)
        self.block_size = 16
        self._max_model_len: int | None = None
        self._model_name: str | None = None
        self.request_log = RequestLog()
        self._init_metrics()

    # ---- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._follow_discovery()), asyncio.create_task(self._follow_events())]

    async def wait_ready(self, timeout_s: float = 900.0) -> None:
        """Until every listed worker is connected (or gone); then at least one must decode."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            listed = {w.worker_id for w in self.discovery.list()}
            if listed <= set(self.workers) and not self._starting:
                if self._decoders():
                    return
                raise RuntimeError("no worker that can serve requests (role both or decode) is running")
            if loop.time() > deadline:
                raise TimeoutError("workers did not become ready in time")
            await asyncio.sleep(0.1)

    async def close(self) -> None:
        for task in [*self._tasks, *self._starting.values()]:
            await cancel_and_wait(task)
        for worker in list(self.workers.values()):
            await worker.client.close()
        self.workers.clear()
        self.events.close()

    async def _follow_discovery(self) -> None:
        async for event in self.discovery.watch():
            worker_id = event.worker.worker_id
            if event.kind == "added":
                self._starting[worker_id] = asyncio.create_task(self._connect(event.worker))
            elif event.kind == "updated":
                self._follow_role(event.worker)
            else:
                task = self._starting.pop(worker_id, None)
                await cancel_and_wait(task)
                worker = self.workers.pop(worker_id, None)
                self.index.remove_worker(worker_id)
                self._wake()
                self.events.disconnect(worker_id)
                if worker is not None:
                    worker.client.mark_dead(event.reason or "removed from discovery")
                    await worker.client.close()

    def _follow_role(self, info) -> None:
        """A flip seen in discovery: ours (`set_role` already switched the client) or another
        router's (cluster mode: several frontends, one of which flipped the worker)."""
        worker = self.workers.get(info.worker_id)
        if worker is not None and worker.client.role != info.role:
            logger.info("worker %s is now %s (from discovery)", info.worker_id, info.role)
            worker.client.info = msgspec.structs.replace(worker.client.info, role=info.role)
            self._wake()

    async def _connect(self, info) -> None:
        client = WorkerClient(info, client_tag=self.client_tag)
        try:
            await client.start()
        except Exception as exc:  # noqa: BLE001 - a worker that never came up is just not used
            logger.error("worker %s did not start: %s", info.worker_id, exc)
            await client.close()
            return
        finally:
            self._starting.pop(info.worker_id, None)
        worker = self.workers[info.worker_id] = _Worker(client)
        client.on_dump = self._on_dump
        client.on_leaving = self._on_leaving
        client.on_change = self._wake  # another router flipped or (un)drained it
        self.index.add_worker(info.worker_id)
        self.events.connect(info.worker_id, info.event_addr)
        self._resync(worker)
        self.block_size = client.ready.block_size
        self._model_name = self._model_name or client.model_name
        self._max_model_len = min(self._max_model_len or client.max_model_len, client.max_model_len)
        logger.info("worker %s (%s) ready", info.worker_id, info.role)

    async def _follow_events(self) -> None:
        async for _topic, event in self.events.events():
            worker = self.workers.get(event.worker_id)
            if worker is None:
                continue
            if isinstance(event, LoadReport):
                worker.client.update_stats(event.stats)
                self._wake()
            elif isinstance(event, KVEventBatch):
                self.on_kv_events(worker, event)

    def on_kv_events(self, worker: _Worker, batch: KVEventBatch) -> None:
        if worker.events.accept(batch):
            self.index.apply(worker.worker_id, batch.events)
        elif worker.events.resyncing and not worker.events.dump_requested:
            logger.info("KV events of %s: gap or new instance at batch %d; resyncing", worker.worker_id,
                        batch.event_id)
            self._resync(worker)

    def _resync(self, worker: _Worker) -> None:
        """Drop what the index holds for the worker and ask it for a dump."""
        worker.events.start_resync()
        worker.events.dump_requested = True
        self.index.clear_worker(worker.worker_id)
        self.resyncs.inc()
        worker.client.request_dump()

    def _on_leaving(self, msg: WorkerLeaving) -> None:
        """The worker got SIGTERM: no new requests go to it (its own ones finish or move)."""
        worker = self.workers.get(msg.worker_id)
        if worker is not None:
            worker.draining = True
            logger.info("worker %s is leaving: drained (%d requests in flight)", msg.worker_id, worker.inflight)
            self._wake()

    def _on_dump(self, dump: KVDump) -> None:
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

    # ---- EngineClient ----------------------------------------------------------------------------
    @property
    def max_model_len(self) -> int:
        return self._max_model_len or 0

    @property
    def model_name(self) -> str:
        return self._model_name or ""

    def is_healthy(self) -> bool:
        return bool(self._decoders())

    def readiness(self) -> tuple[bool, dict]:
        """Ready to serve: at least one routable worker that decodes (role both or decode); prefill
        workers are optional (without them prompts prefill on their decode worker). The dict counts
        routable workers by role, for the health endpoint's answer."""
        roles: dict[str, int] = {"both": 0, "prefill": 0, "decode": 0}
        for worker in self.workers.values():
            if worker.routable:
                roles[worker.client.role] = roles.get(worker.client.role, 0) + 1
        return roles["both"] + roles["decode"] > 0, roles

    @property
    def queue_length(self) -> int:
        """Requests waiting in the router for a worker with room (the other replicas' too, for the
        planner's control router: `replica_queue_depth`)."""
        others = self.replica_queue_depth() if self.replica_queue_depth is not None else 0
        return len(self._queue) + others

    def stats(self) -> EngineStats | None:
        reports = [w.client.stats() for w in self.workers.values() if w.client.stats() is not None]
        if not reports:
            return None
        fields = EngineStats.__struct_fields__
        return EngineStats(**{f: sum(getattr(r, f) for r in reports) for f in fields})

    async def abort(self, request_id: str) -> None:
        for worker in self.workers.values():
            await worker.client.abort(request_id)

    def _decoders(self, exclude: str | None = None) -> list[_Worker]:
        return [w for w in self.workers.values()
                if w.client.role in ("both", "decode") and w.routable and w.worker_id != exclude]

    def _prefillers(self, exclude: str | None = None) -> list[_Worker]:
        return [w for w in self.workers.values()
                if w.client.role == "prefill" and w.routable and w.worker_id != exclude]

    # ---- drain and role flips (the planner's actuators) --------------------------------------------
    async def wait_worker(self, worker_id: str, timeout_s: float = 600.0) -> None:
        """Until a newly registered worker is connected and routable."""
        deadline = time.monotonic() + timeout_s
        while worker_id not in self.workers:
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker {worker_id} did not become ready in {timeout_s:g}s")
            if worker_id not in self._starting and worker_id not in {w.worker_id for w in self.discovery.list()}:
                raise RuntimeError(f"worker {worker_id} went away before it was ready")
            await asyncio.sleep(DRAIN_POLL_S)

    async def drain(self, worker_id: str, timeout_s: float = 300.0) -> float:
        """Route nothing new to the worker and wait until it has finished everything it has:
        its admitted requests, KV it holds for a decode worker, KV it is pulling. Returns the
        seconds it took. On timeout the worker stays drained (the caller undrains or removes it)."""
        worker = self.workers.get(worker_id)
        if worker is None:
            raise KeyError(f"no worker {worker_id}")
        started = time.monotonic()
        deadline = started + timeout_s
        worker.draining = True
        worker.client.set_draining(True)  # every router replica stops sending it work
        self._wake()  # queued requests may now route elsewhere
        while worker.inflight > 0:
            if not worker.client.is_healthy():
                raise RuntimeError(f"worker {worker_id} died while draining")
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker {worker_id} still has {worker.inflight} requests after {timeout_s:g}s")
            await asyncio.sleep(DRAIN_POLL_S)
        # The router's count is zero; held KV is freed by the decode worker's ReleaseKV, which the
        # router does not see. The worker accepts SetRole (of its own role) only once it holds nothing.
        while True:
            try:
                await worker.client.set_role(worker.client.role)
                return time.monotonic() - started
            except RoleChangeError:
                if time.monotonic() > deadline or not worker.client.is_healthy():
                    raise
                await asyncio.sleep(DRAIN_POLL_S)

    def undrain(self, worker_id: str) -> None:
        worker = self.workers.get(worker_id)
        if worker is not None and not worker.client.leaving:
            worker.draining = False
            worker.client.set_draining(False)
            self._wake()

    def is_draining(self, worker_id: str) -> bool:
        worker = self.workers.get(worker_id)
        return worker is not None and worker.draining

    async def set_role(self, worker_id: str, role: str, token_budget: int | None = None,
                       max_num_seqs: int | None = None) -> None:
        """Flip a drained worker's role, with the new role's scheduler limits (raises RoleChangeError
        if it refuses). Its prefix cache stays valid: the index keeps its blocks."""
        await self.workers[worker_id].client.set_role(role, token_budget=token_budget, max_num_seqs=max_num_seqs)
        logger.info("worker %s is now %s", worker_id, role)

    # ---- admission -----------------------------------------------------------------------------
    def _has_room(self) -> bool:
        limit = self.config.max_pending_prefill_tokens
        return any(w.pending < limit for w in self._decoders() + self._prefillers())

    async def admit(self, request: AddRequest) -> None:
        """Routes the request now, or queues it until a worker has room. Raises OverloadedError
        (queue full, or waited past `queue_timeout_s`) or EngineDeadError (no worker)."""
        if request.request_id in self._plans:
            return
        arrived = time.monotonic()
        self.request_log.arrived()
        self._expire_plans()
        if not self._queue and self._has_room():
            self._plans[request.request_id] = self._plan(request, arrived)
            return
        if not self._decoders():
            raise EngineDeadError("no worker is available to serve requests")
        if len(self._queue) >= self.config.max_queue:
            self.rejected.labels("queue_full").inc()
            raise OverloadedError(f"the server is overloaded: {len(self._queue)} requests are queued",
                                  retry_after_s=self._retry_after_s())
        future = asyncio.get_running_loop().create_future()
        priority = request.routing.priority if request.routing is not None else 0
        entry = [-priority, next(self._seq), request, future, arrived]
        heapq.heappush(self._queue, entry)
        self.queue_depth.set(len(self._queue))
        try:
            await asyncio.wait_for(asyncio.shield(future), self.config.queue_timeout_s)
        except asyncio.TimeoutError:
            self.rejected.labels("queue_timeout").inc()
            raise OverloadedError(f"the request waited {self.config.queue_timeout_s:g} s for a worker",
                                  retry_after_s=self._retry_after_s()) from None
        finally:
            if not future.done():  # timed out or cancelled (client gone): leave the queue
                future.cancel()
                self._queue.remove(entry)
                heapq.heapify(self._queue)
                self.queue_depth.set(len(self._queue))
        future.result()  # EngineDeadError if the workers went away while it waited

    def _retry_after_s(self) -> int:
        return max(1, min(60, round(self.config.queue_timeout_s / 4)))

    def _wake(self) -> None:
        """Route queued requests (highest priority, then oldest) while some worker has room."""
        while self._queue and self._has_room():
            _, _, request, future, arrived = heapq.heappop(self._queue)
            if future.done():
                continue
            try:
                self._plans[request.request_id] = self._plan(request, arrived)
                future.set_result(None)
            except EngineDeadError as exc:
                future.set_exception(exc)
        self.queue_depth.set(len(self._queue))

    def _expire_plans(self) -> None:
        now = time.monotonic()
        for request_id in [r for r, p in self._plans.items() if now - p.created > PLAN_TTL_S]:
            self._plans.pop(request_id).release()

    def _plan(self, request: AddRequest, arrived: float | None = None, exclude: str | None = None) -> _Plan:
        """The route of one request (not to worker `exclude`), with the router's bookkeeping updated for it."""
        started = time.perf_counter()
        arrived = time.monotonic() if arrived is None else arrived
        decoders = self._decoders(exclude)
        if not decoders:
            raise EngineDeadError("no worker is available to serve requests")
        self._counter += 1
        prompt = request.prompt_token_ids
        hints = request.routing
        hashes = block_hashes(prompt, self.block_size)
        overlaps = self.index.overlaps(hashes)
        views = [w.view(overlaps.get(w.worker_id, 0)) for w in decoders]
        chosen = self._session_worker(hints, views)
        policy = "session" if chosen is not None else self.config.policy
        if chosen is None:
            weights = self.config.weights
            if hints is not None and (hints.overlap_weight is not None or hints.temperature is not None):
                weights = KVWeights(
                    overlap_weight=weights.overlap_weight if hints.overlap_weight is None else hints.overlap_weight,
                    temperature=weights.temperature if hints.temperature is None else hints.temperature)
            chosen = choose_worker(views, self.config.policy, len(prompt), self.block_size, self._counter,
                                   self._rng, weights)
        if hints is not None and hints.session_id:
            pinned = self.sessions.get(hints.session_id)
            self.pin_session(hints.session_id, chosen.worker_id)
            if pinned != chosen.worker_id and self.on_session_pinned is not None:
                self.on_session_pinned(hints.session_id, chosen.worker_id)
        decode = self.workers[chosen.worker_id]
        uncached = len(prompt) - chosen.overlap_blocks * self.block_size
        prefill = None
        prefillers = self._prefillers(exclude)
        if prefillers:
            pviews = [w.view(overlaps.get(w.worker_id, 0)) for w in prefillers]
            where = decide_prefill(uncached, pviews, self.config.disagg)
            if where == "remote":
                pick = choose_prefill_worker(pviews, len(prompt), self.block_size, self._rng)
                prefill = self.workers[pick.worker_id]
                uncached = len(prompt) - pick.overlap_blocks * self.block_size
            self.prefill_decisions.labels(where).inc()
        plan = _Plan(decode, prefill, hashes, uncached, blocks=-(-len(prompt) // self.block_size),
                     created=time.monotonic(), arrived=arrived, pending_on=prefill or decode,
                     pending_tokens=uncached, prefill_held=prefill is not None)
        plan.pending_on.pending_prefill_tokens += uncached
        decode.inflight += 1
        if prefill is not None:
            prefill.inflight += 1
        decode.open_requests += 1
        decode.active_blocks += plan.blocks
        self.decisions.labels(policy).inc()
        self.overlap_blocks.observe(chosen.overlap_blocks)
        self.decision_s.observe(time.perf_counter() - started)
        return plan

    def _session_worker(self, hints, views: list[WorkerView]) -> WorkerView | None:
        """The session's worker, unless it is gone or over its pending-prefill limit."""
        if hints is None or not hints.session_id:
            return None
        worker_id = self.sessions.get(hints.session_id)
        view = next((v for v in views if v.worker_id == worker_id), None)
        if view is None or view.pending_prefill_tokens >= self.config.max_pending_prefill_tokens:
            return None
        return view

    def pin_session(self, session_id: str, worker_id: str) -> None:
        """Keep the session's requests on `worker_id` (a pin made here or by another replica)."""
        self.sessions[session_id] = worker_id
        self.sessions.move_to_end(session_id)
        if len(self.sessions) > SESSIONS_MAX:
            self.sessions.popitem(last=False)

    # ---- generation ------------------------------------------------------------------------------
    async def generate(self, request: AddRequest) -> AsyncIterator[TokenDelta]:
        plan = self._plans.pop(request.request_id, None)
        if plan is None:
            await self.admit(request)
            plan = self._plans.pop(request.request_id)
        arrived = plan.arrived
        attempt = request  # what the current worker runs: the request, or its continuation after a move
        output: list[int] = []  # every token streamed to the client
        attempt_start = 0  # len(output) when the current attempt began
        first_at = last_at = None
        cached = 0
        migrations = 0
        try:
            while True:
                try:
                    stream = self._attempt(plan, attempt)
                    async with contextlib.aclosing(stream):
                        async for delta in stream:
                            if delta.new_token_ids:
                                output.extend(delta.new_token_ids)
                                last_at = time.monotonic()
                                first_at = first_at or last_at
                                if plan.pending_on is not None:
                                    plan.first_token()
                                    self._wake()
                            if migrations:  # the client's request is the original: its prompt, its cache hits
                                delta = msgspec.structs.replace(
                                    delta, num_prompt_tokens=len(request.prompt_token_ids), num_cached_tokens=cached)
                            cached = max(cached, delta.num_cached_tokens)
                            yield delta
                    break
                except WorkerLost as lost:
                    if migrations >= self.config.max_migrations:
                        moved = f" (it had moved {migrations} times)" if migrations else ""
                        raise EngineDeadError(f"{lost}{moved}") from None
                    migrations += 1
                    plan.release()
                    plan = None
                    attempt = resume_request(request, output)
                    if attempt is None:  # every token came; only the finished delta was lost
                        yield TokenDelta(request_id=request.request_id, new_token_ids=[], finished=True,
                                         finish_reason="length", num_prompt_tokens=len(request.prompt_token_ids),
                                         num_cached_tokens=cached)
                        return
                    plan = self._plan(attempt, arrived, exclude=lost.worker_id)
                    attempt_start = len(output)
                    self.migrations.labels(lost.reason).inc()
                    logger.info("request %s moves to %s after %d tokens (%s: %s)", request.request_id,
                                plan.decode.worker_id, len(output), lost.reason, lost)
            if last_at is not None:
                self.request_log.finish(arrived, first_at, last_at, len(request.prompt_token_ids), cached,
                                        len(output))
            # The worker now caches the prompt and output blocks; its KV events say so too, but the
            # conversation's next turn may arrive before them (another socket). Removals correct it.
            # Only the blocks past the prompt's full ones are hashed here: those came with the plan.
            bs, hashes = self.block_size, plan.hashes
            tail = attempt.prompt_token_ids[len(hashes) * bs:] + output[attempt_start:]
            self.index.store(plan.decode.worker_id,
                             hashes + block_hashes(tail, bs, hashes[-1] if hashes else ROOT_PARENT_HASH))
        finally:
            if plan is not None:
                plan.release()
            self._wake()

    def _attempt(self, plan: _Plan, request: AddRequest) -> AsyncIterator[TokenDelta]:
        if plan.prefill is None:
            return self._local(plan.decode, request)
        return self._remote(plan.prefill, plan.decode, request, plan)

    @staticmethod
    def _lost(worker: _Worker, exc: EngineDeadError) -> WorkerLost:
        return WorkerLost("worker_left" if worker.client.leaving else "worker_died", str(exc), worker.worker_id)

    async def _local(self, worker: _Worker, request: AddRequest) -> AsyncIterator[TokenDelta]:
        queued = False
        try:
            async for delta in worker.client.generate(request):
                if not queued and delta.queue_s is not None:
                    queued = True
                    self.queue_s.observe(delta.queue_s)
                yield delta
        except EngineDeadError as exc:
            raise self._lost(worker, exc) from None

    async def _remote(self, prefill: _Worker, decode: _Worker, request: AddRequest,
                      plan: _Plan | None = None) -> AsyncIterator[TokenDelta]:
        params = request.sampling_params
        prefill_request = msgspec.structs.replace(
            request, hold_kv=True, sampling_params=msgspec.structs.replace(params, max_tokens=1))
        sent = time.monotonic()
        first = await self._run_prefill(prefill, prefill_request)
        if first is None:  # the prefill worker died before its token: prefill on the decode worker
            self.prefill_fallbacks.inc()
            async for delta in self._local(decode, request):
                yield delta
            return
        if first.queue_s is not None:
            self.queue_s.observe(first.queue_s)
            self.prefill_s.observe(max(time.monotonic() - sent - first.queue_s, 0.0))
        kv = first.kv_transfer_params
        if kv is None or params.max_tokens == 1:  # finished at its first token (or an error)
            if kv is not None:
                prefill.client.release_kv(request.request_id)
            yield msgspec.structs.replace(first, kv_transfer_params=None)
            return
        handed = False
        try:
            yield msgspec.structs.replace(first, finished=False, finish_reason=None, kv_transfer_params=None)
            decode_request = msgspec.structs.replace(request, kv_transfer_params=kv,
                                                     output_token_ids=list(first.new_token_ids))
            handed_at = time.monotonic()
            handed = True
            stream = decode.client.generate(decode_request)
            async with contextlib.aclosing(stream):
                async for delta in stream:
                    if plan is not None:
                        plan.prefill_done()  # the decode worker has pulled the KV (or failed to)
                    if delta.error is not None and delta.error.startswith(KV_TRANSFER_FAILED):
                        # The KV's source is gone (its prefill worker died): prefill again elsewhere.
                        raise WorkerLost("kv_transfer_failed", delta.error, prefill.worker_id)
                    if delta.kv_transfer_s is not None:
                        self.kv_transfer_s.observe(delta.kv_transfer_s)
                        if delta.new_token_ids:
                            self.first_decode_s.observe(max(time.monotonic() - handed_at - delta.kv_transfer_s, 0.0))
                    # The prompt's cache hits are the prefill worker's (a copy only when they differ).
                    if delta.num_cached_tokens != first.num_cached_tokens:
                        delta = msgspec.structs.replace(delta, num_cached_tokens=first.num_cached_tokens)
                    yield delta
        except EngineDeadError as exc:
            prefill.client.release_kv(request.request_id)  # the decode worker won't pull any more
            raise self._lost(decode, exc) from None
        finally:
            if not handed:
                prefill.client.release_kv(request.request_id)

    async def _run_prefill(self, prefill: _Worker, request: AddRequest) -> TokenDelta | None:
        """The prefill worker's one finished delta; None if the worker died before it."""
        last = None
        try:
            async for delta in prefill.client.generate(request):
                last = delta
        except EngineDeadError as exc:
            logger.warning("prefill worker %s failed %s: %s", prefill.worker_id, request.request_id, exc)
            return None
        return last

    # ---- metrics -----------------------------------------------------------------------------
    def _init_metrics(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.prefill_decisions = Counter("tidal_prefill_decisions", "Where prompts were prefilled "
                                         "(conditional disaggregation).", ["where"], registry=r)
        for where in ("local", "remote"):
            self.prefill_decisions.labels(where)
        self.prefill_fallbacks = Counter("tidal_prefill_fallbacks", "Remote prefills that fell back to "
                                         "local because the prefill worker died.", registry=r)
        self.queue_s = Histogram("tidal_request_queue_seconds", "Time from arrival at a worker to the "
                                 "request's first step there.", buckets=STAGE_BUCKETS_S, registry=r)
        self.prefill_s = Histogram("tidal_request_prefill_seconds", "Remote prefill time (after queueing), "
                                   "as the router sees it.", buckets=STAGE_BUCKETS_S, registry=r)
        self.kv_transfer_s = Histogram("tidal_request_kv_transfer_seconds", "Time the decode worker spent "
                                       "pulling a request's KV.", buckets=STAGE_BUCKETS_S, registry=r)
        self.first_decode_s = Histogram("tidal_request_first_decode_seconds", "From handing a request to its "
                                        "decode worker to its next token, transfer excluded.",
                                        buckets=STAGE_BUCKETS_S, registry=r)
        self.decisions = Counter("tidal_router_decisions", "Routing decisions, by the policy that made them "
                                 "(`session`: a session's worker kept).", ["policy"], registry=r)
        self.overlap_blocks = Histogram("tidal_router_overlap_blocks", "Prompt blocks the chosen worker "
                                        "already held.", buckets=OVERLAP_BUCKETS, registry=r)
        # Each frontend process's router replica has its own queue: they add up, and a dead one's drops.
        self.queue_depth = Gauge("tidal_router_queue_depth", "Requests waiting in the router for a worker "
                                 "with room.", registry=r, multiprocess_mode="livesum")
        self.rejected = Counter("tidal_router_rejected", "Requests refused with 503: queue full or waited too "
                                "long.", ["reason"], registry=r)
        for reason in ("queue_full", "queue_timeout"):
            self.rejected.labels(reason)
        self.resyncs = Counter("tidal_router_resyncs", "Times a worker's KV index was rebuilt from a dump "
                               "(new worker, restarted worker, or a gap in its events).", registry=r)
        self.migrations = Counter("tidal_request_migrations", "Requests moved to another worker mid-stream, "
                                  "by why their worker went away.", ["reason"], registry=r)
        for reason in MIGRATION_REASONS:
            self.migrations.labels(reason)
        self.decision_s = Histogram("tidal_router_decision_seconds", "Time to route one request (hashing, "
                                    "index lookup, policy).", buckets=DECISION_BUCKETS_S, registry=r)
        # Scrape-time and never file-backed: multiprocess `/metrics` renders this process's alone.
        self.live_collectors = (_WorkerCollector(self),)
        r.register(self.live_collectors[0])

    def worker_table(self) -> list[dict]:
        """Each worker's role and latest load report (the admin endpoint's answer)."""
        table = []
        for worker in self.workers.values():
            stats = worker.client.stats()
            table.append({"worker_id": worker.worker_id, "role": worker.client.role, "pid": worker.client.info.pid,
                          "healthy": worker.client.is_healthy(), "open_requests": worker.client.num_open_requests,
                          "draining": worker.draining, "leaving": worker.client.leaving,
                          "stats": msgspec.to_builtins(stats) if stats is not None else None})
        return table


class _WorkerCollector:
    """Per-worker gauges from the latest load reports, read at scrape time (never file-backed: every
    router replica sees the same reports, so in multiprocess mode the scraping process's alone render)."""

    GAUGES = {
        "tidal_worker_kv_blocks_used": ("kv_blocks_used", "KV blocks in use on the worker (held ones included)."),
        "tidal_worker_running_requests": ("num_running", "Requests running on the worker."),
        "tidal_worker_waiting_requests": ("num_waiting", "Requests queued on the worker."),
        "tidal_worker_waiting_for_kv": ("num_waiting_for_kv", "Requests pulling their KV on the worker."),
        "tidal_worker_held_kv": ("num_held_kv", "Finished prefills whose KV the worker holds for a puller."),
    }

    def __init__(self, router: Router) -> None:
        self.router = router

    def collect(self):
        families = {name: GaugeMetricFamily(name, doc, labels=["worker_id", "role"])
                    for name, (_, doc) in self.GAUGES.items()}
        for worker in self.router.workers.values():
            stats = worker.client.stats()
            if stats is None:
                continue
            for name, (attr, _) in self.GAUGES.items():
                families[name].add_metric([worker.worker_id, worker.client.role], getattr(stats, attr))
        yield from families.values()
