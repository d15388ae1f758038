"""The router service: the frontend's `EngineClient` over every worker that discovery lists.

Owns one `WorkerClient` per live worker (following `Discovery.watch`), the event subscriber
that brings their load reports, the prefix index, and its own bookkeeping of what it sent where
(open requests, prefill tokens without a token back yet), so bursts that arrive between load
reports spread out instead of all picking the same worker.

One request (`generate`):
1. pick the decode-capable worker (`both` or `decode`) by the routing policy;
2. if prefill workers are alive, decide local or remote prefill (conditional disaggregation)
   from the prompt's uncached length on that worker and the prefill queues;
3. local: the request runs there whole. Remote: the chosen prefill worker runs it with
   max_tokens=1 and `hold_kv`; its first token streams to the client at once; the decode worker
   gets the request with the prefill's `KVTransferParams`, pulls the KV, releases the prefill
   worker's blocks and streams the rest. A prefill worker that dies before its token makes the
   request fall back to a local prefill; after it, the decode side's pull fails the request.
Blocks held on a prefill worker are released on every path that does not hand them to a
decode worker (stop at the first token, client gone, decode worker gone).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import msgspec
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from tidal.frontend.engine_client import EngineDeadError
from tidal.hashing import block_hashes
from tidal.protocol import AddRequest, EngineStats, LoadReport, TokenDelta
from tidal.router.index import ApproxPrefixIndex
from tidal.router.policy import (POLICIES, DisaggPolicy, WorkerView, choose_prefill_worker, choose_worker,
                                 decide_prefill)
from tidal.runtime.discovery import Discovery
from tidal.runtime.events import ZmqEventSubscriber, cancel_and_wait
from tidal.worker.client import WorkerClient

logger = logging.getLogger(__name__)

STAGE_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                   30.0, 60.0)


@dataclass(frozen=True)
class RouterConfig:
    policy: str = "round_robin"
    """How a decode (or aggregated) worker is chosen: round_robin, random, least_loaded, kv."""
    disagg: DisaggPolicy = field(default_factory=DisaggPolicy)
    seed: int = 0


@dataclass
class _Worker:
    client: WorkerClient
    pending_prefill_tokens: int = 0

    @property
    def worker_id(self) -> str:
        return self.client.worker_id

    def view(self, overlap_blocks: int) -> WorkerView:
        stats = self.client.stats()
        usage = stats.kv_blocks_used / stats.kv_blocks_total if stats and stats.kv_blocks_total else 0.0
        return WorkerView(self.worker_id, self.client.role, open_requests=self.client.num_open_requests,
                          pending_prefill_tokens=self.pending_prefill_tokens, overlap_blocks=overlap_blocks,
                          kv_usage=usage, reported_waiting=stats.num_waiting if stats else 0)


class Router:
    def __init__(self, discovery: Discovery, config: RouterConfig = RouterConfig()):
        if config.policy not in POLICIES:
            raise ValueError(f"unknown routing policy {config.policy!r}; choose one of {', '.join(POLICIES)}")
        self.discovery = discovery
        self.config = config
        self.workers: dict[str, _Worker] = {}
        self.index = ApproxPrefixIndex()
        self.events = ZmqEventSubscriber(("load",))
        self._starting: dict[str, asyncio.Task] = {}
        self._tasks: list[asyncio.Task] = []
        self._counter = 0
        self._rng = random.Random(config.seed)
        self.block_size = 16
        self._max_model_len: int | None = None
        self._model_name: str | None = None
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
            else:
                task = self._starting.pop(worker_id, None)
                await cancel_and_wait(task)
                worker = self.workers.pop(worker_id, None)
                self.index.remove_worker(worker_id)
                self.events.disconnect(worker_id)
                if worker is not None:
                    worker.client.mark_dead(event.reason or "removed from discovery")
                    await worker.client.close()

    async def _connect(self, info) -> None:
        client = WorkerClient(info)
        try:
            await client.start()
        except Exception as exc:  # noqa: BLE001 - a worker that never came up is just not used
            logger.error("worker %s did not start: %s", info.worker_id, exc)
            await client.close()
            return
        finally:
            self._starting.pop(info.worker_id, None)
        self.workers[info.worker_id] = _Worker(client)
        self.index.add_worker(info.worker_id, client.ready.kv_blocks_total)
        self.events.connect(info.worker_id, info.event_addr)
        self.block_size = client.ready.block_size
        self._model_name = self._model_name or client.model_name
        self._max_model_len = min(self._max_model_len or client.max_model_len, client.max_model_len)
        logger.info("worker %s (%s) ready", info.worker_id, info.role)

    async def _follow_events(self) -> None:
        async for _topic, event in self.events.events():
            if isinstance(event, LoadReport):
                worker = self.workers.get(event.worker_id)
                if worker is not None:
                    worker.client.update_stats(event.stats)

    # ---- EngineClient ----------------------------------------------------------------------------
    @property
    def max_model_len(self) -> int:
        return self._max_model_len or 0

    @property
    def model_name(self) -> str:
        return self._model_name or ""

    def is_healthy(self) -> bool:
        return bool(self._decoders())

    def stats(self) -> EngineStats | None:
        reports = [w.client.stats() for w in self.workers.values() if w.client.stats() is not None]
        if not reports:
            return None
        fields = EngineStats.__struct_fields__
        return EngineStats(**{f: sum(getattr(r, f) for r in reports) for f in fields})

    async def abort(self, request_id: str) -> None:
        for worker in self.workers.values():
            await worker.client.abort(request_id)

    def _decoders(self) -> list[_Worker]:
        return [w for w in self.workers.values() if w.client.role in ("both", "decode") and w.client.is_healthy()]

    def _prefillers(self) -> list[_Worker]:
        return [w for w in self.workers.values() if w.client.role == "prefill" and w.client.is_healthy()]

    async def generate(self, request: AddRequest) -> AsyncIterator[TokenDelta]:
        decoders = self._decoders()
        if not decoders:
            raise EngineDeadError("no worker is available to serve requests")
        self._counter += 1
        prompt = request.prompt_token_ids
        hashes = block_hashes(prompt, self.block_size)
        views = {w.worker_id: w.view(self.index.overlap_blocks(w.worker_id, hashes)) for w in decoders}
        chosen = choose_worker(list(views.values()), self.config.policy, len(prompt), self.block_size,
                               self._counter, self._rng)
        decode = self.workers[chosen.worker_id]
        prefillers = self._prefillers()
        where = "local"
        prefill = None
        if prefillers:
            pviews = [w.view(self.index.overlap_blocks(w.worker_id, hashes)) for w in prefillers]
            uncached = len(prompt) - chosen.overlap_blocks * self.block_size
            where = decide_prefill(uncached, pviews, self.config.disagg)
            if where == "remote":
                pick = choose_prefill_worker(pviews, len(prompt), self.block_size, self._counter)
                prefill = self.workers[pick.worker_id]
            self.prefill_decisions.labels(where).inc()
        if prefill is None:
            stream = self._local(decode, request, len(prompt) - chosen.overlap_blocks * self.block_size)
        else:
            stream = self._remote(prefill, decode, request, hashes)
        output: list[int] = []
        async with contextlib.aclosing(stream):
            async for delta in stream:
                output.extend(delta.new_token_ids)
                yield delta
        # Only a request that ran to the end surely left its blocks (prompt and output) there.
        self.index.record(decode.worker_id, block_hashes(prompt + output, self.block_size))

    async def _local(self, worker: _Worker, request: AddRequest, uncached: int) -> AsyncIterator[TokenDelta]:
        worker.pending_prefill_tokens += uncached
        pending = uncached
        try:
            async for delta in worker.client.generate(request):
                if pending:
                    worker.pending_prefill_tokens -= pending
                    pending = 0
                    if delta.queue_s is not None:
                        self.queue_s.observe(delta.queue_s)
                yield delta
        finally:
            worker.pending_prefill_tokens -= pending

    async def _remote(self, prefill: _Worker, decode: _Worker, request: AddRequest,
                      hashes: list[int]) -> AsyncIterator[TokenDelta]:
        params = request.sampling_params
        prefill_request = msgspec.structs.replace(
            request, hold_kv=True, sampling_params=msgspec.structs.replace(params, max_tokens=1))
        sent = time.monotonic()
        first = await self._run_prefill(prefill, prefill_request)
        if first is None:  # the prefill worker died before its token: prefill on the decode worker
            self.prefill_fallbacks.inc()
            async for delta in self._local(decode, request, len(request.prompt_token_ids)):
                yield delta
            return
        if first.kv_transfer_params is not None:
            self.index.record(prefill.worker_id, hashes)
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
                    if delta.kv_transfer_s is not None:
                        self.kv_transfer_s.observe(delta.kv_transfer_s)
                        if delta.new_token_ids:
                            self.first_decode_s.observe(max(time.monotonic() - handed_at - delta.kv_transfer_s, 0.0))
                    # The prompt's cache hits are the prefill worker's.
                    yield msgspec.structs.replace(delta, num_cached_tokens=first.num_cached_tokens)
        except EngineDeadError:
            prefill.client.release_kv(request.request_id)  # the decode worker won't pull any more
            raise
        finally:
            if not handed:
                prefill.client.release_kv(request.request_id)

    async def _run_prefill(self, prefill: _Worker, request: AddRequest) -> TokenDelta | None:
        """The prefill worker's one finished delta; None if the worker died before it."""
        tokens = len(request.prompt_token_ids)
        prefill.pending_prefill_tokens += tokens
        last = None
        try:
            async for delta in prefill.client.generate(request):
                last = delta
        except EngineDeadError as exc:
            logger.warning("prefill worker %s failed %s: %s", prefill.worker_id, request.request_id, exc)
            return None
        finally:
            prefill.pending_prefill_tokens -= tokens
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
        r.register(_WorkerCollector(self))

    def worker_table(self) -> list[dict]:
        """Each worker's role and latest load report (the admin endpoint's answer)."""
        table = []
        for worker in self.workers.values():
            stats = worker.client.stats()
            table.append({"worker_id": worker.worker_id, "role": worker.client.role, "pid": worker.client.info.pid,
                          "healthy": worker.client.is_healthy(), "open_requests": worker.client.num_open_requests,
                          "stats": msgspec.to_builtins(stats) if stats is not None else None})
        return table


class _WorkerCollector:
    """Per-worker gauges from the latest load reports."""

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
