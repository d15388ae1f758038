"""The dispatcher: where one request runs, and its stream from there to the client.

`plan` routes a request and adds its bookkeeping to the workers it uses (`Plan.release` takes it
off again):
1. the decode-capable worker (`both` or `decode`): the session's worker if it has one and is not
   overloaded (`policy.session_worker`), else by the routing policy (`kv` weighs the prompt's
   uncached blocks there plus its pending prefill against its active blocks);
2. if prefill workers are alive, local or remote prefill (conditional disaggregation,
   `policy.decide_prefill`) from the prompt's uncached length on that worker and the prefill queues.

`generate` streams it; until its first token comes, within `queue_timeout_s` of its arrival while
its worker has a queue (`admission.first_delta`), else 503. Local: the request runs on its decode worker whole. Remote (`remote.py`):
the prefill worker runs it with max_tokens=1 and `hold_kv`, then the decode worker pulls the KV and
streams the rest. Migration (`migration.py`): when the worker streaming the request dies or
leaves, or the decode worker's KV pull fails (its prefill worker died), the request is planned
again, without that worker, as its prompt plus the tokens streamed so far, and the stream goes on
from the new worker; up to `max_migrations` times, then the client gets the error. Every finished
request's latencies and lengths go to the `RequestLog`.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import msgspec

from tidal.errors import EngineDeadError, OverloadedError
from tidal.hashing import ROOT_PARENT_HASH, block_hashes
from tidal.protocol import AddRequest, RoutingHints, TokenDelta
from tidal.router.admission import first_delta, retry_after_s
from tidal.router.config import RouterConfig
from tidal.router.metrics import RouterMetrics
from tidal.router.migration import WorkerLost, resume_request
from tidal.router.plan import Plan, Route, RouteInfo
from tidal.router.policy import (KVWeights, WorkerView, choose_prefill_worker, choose_worker, decide_prefill,
                                 session_worker)
from tidal.router.remote import RemotePrefill, lost_worker
from tidal.router.request_log import RequestLog
from tidal.router.sessions import SessionTable
from tidal.router.workers import Worker, WorkerSet

logger = logging.getLogger(__name__)


@dataclass
class _Run:
    """One client request across its attempts (one per worker it ran on)."""

    request: AddRequest
    plan: Plan | None
    attempt: AddRequest  # what the current worker runs: the request, or its continuation after a move
    arrived: float  # when the router first saw it (before any queueing)
    output: list[int] = field(default_factory=list)  # every token streamed to the client
    attempt_start: int = 0  # len(output) when the current attempt began
    first_at: float | None = None
    last_at: float | None = None
    cached: int = 0
    migrations: int = 0


class Dispatcher:
    def __init__(self, config: RouterConfig, fleet: WorkerSet, sessions: SessionTable, metrics: RouterMetrics,
                 request_log: RequestLog, admitted: Callable[[AddRequest], Awaitable[Plan]],
                 wake: Callable[[], None]) -> None:
        """`admitted(request)`: the request's plan once the admission queue lets it in; `wake()`: a
        worker may have room now (the admission queue plans what waits)."""
        self.config = config
        self.fleet = fleet
        self.sessions = sessions
        self.metrics = metrics
        self.request_log = request_log
        self.admitted = admitted
        self.wake = wake
        self.remote = RemotePrefill(metrics)
        self.on_session_pinned: Callable[[str, str], None] | None = None  # tells the other replicas
        self.runs: dict[str, _Run] = {}  # request id -> the request while its stream runs
        self._counter = 0
        self._rng = random.Random(config.seed)

    # ---- routing -------------------------------------------------------------------------------
    def plan(self, request: AddRequest, arrived: float | None = None, exclude: str | None = None) -> Plan:
        """The route of one request (not to worker `exclude`), with the workers' bookkeeping updated for it."""
        started = time.perf_counter()
        arrived = time.monotonic() if arrived is None else arrived
        decoders = self.fleet.decoders(exclude)
        if not decoders:
            raise EngineDeadError("no worker is available to serve requests")
        self._counter += 1
        prompt, block_size = request.prompt_token_ids, self.fleet.block_size
        hashes = block_hashes(prompt, block_size)
        overlaps = self.fleet.index.overlaps(hashes)
        chosen = self._choose_decode(request, [w.view(overlaps.get(w.worker_id, 0)) for w in decoders])
        decode = self.fleet.workers[chosen.worker_id]
        prefill, uncached, route = self._choose_prefill(request, overlaps, exclude,
                                                        len(prompt) - chosen.overlap_blocks * block_size)
        plan = Plan(decode, prefill, hashes, uncached, blocks=-(-len(prompt) // block_size),
                    created=time.monotonic(), arrived=arrived, pending_on=prefill or decode,
                    pending_tokens=uncached, prefill_held=prefill is not None, route=route)
        plan.pending_on.sent(uncached)
        decode.inflight += 1
        if prefill is not None:
            prefill.inflight += 1
        decode.open_requests += 1
        decode.active_blocks += plan.blocks
        self.metrics.overlap_blocks.observe(chosen.overlap_blocks)
        self.metrics.decision_s.observe(time.perf_counter() - started)
        return plan

    def _choose_decode(self, request: AddRequest, views: list[WorkerView]) -> WorkerView:
        """The session's worker (pinned to it, telling the other replicas of a new pin), else by policy."""
        hints = request.routing
        session_id = hints.session_id if hints is not None else None
        pinned = self.sessions.get(session_id) if session_id else None
        chosen = session_worker(views, pinned, self.config.max_pending_prefill_tokens)
        self.metrics.decisions.labels("session" if chosen is not None else self.config.policy).inc()
        if chosen is None:
            chosen = choose_worker(views, self.config.policy, len(request.prompt_token_ids), self.fleet.block_size,
                                   self._counter, self._rng, self._weights(hints))
        if session_id:
            self.sessions.pin(session_id, chosen.worker_id)
            if pinned != chosen.worker_id and self.on_session_pinned is not None:
                self.on_session_pinned(session_id, chosen.worker_id)
        return chosen

    def _weights(self, hints: RoutingHints | None) -> KVWeights:
        """The kv policy's weights, with the request's own overrides."""
        weights = self.config.weights
        if hints is None or (hints.overlap_weight is None and hints.temperature is None):
            return weights
        return KVWeights(
            overlap_weight=weights.overlap_weight if hints.overlap_weight is None else hints.overlap_weight,
            temperature=weights.temperature if hints.temperature is None else hints.temperature)

    def _choose_prefill(self, request: AddRequest, overlaps: dict[str, int], exclude: str | None,
                        uncached: int) -> tuple[Worker | None, int, Route]:
        """The prefill worker for a remote prefill (None: local), the prompt tokens left to compute and
        the route."""
        prefillers = self.fleet.prefillers(exclude)
        if not prefillers:
            return None, uncached, "agg"
        views = [w.view(overlaps.get(w.worker_id, 0)) for w in prefillers]
        where = decide_prefill(uncached, views, self.config.disagg)
        self.metrics.prefill_decisions.labels(where).inc()
        if where == "local":
            return None, uncached, "local"
        num_prompt_tokens, block_size = len(request.prompt_token_ids), self.fleet.block_size
        pick = choose_prefill_worker(views, num_prompt_tokens, block_size, self._rng)
        return self.fleet.workers[pick.worker_id], num_prompt_tokens - pick.overlap_blocks * block_size, "remote"

    # ---- streaming -----------------------------------------------------------------------------
    async def generate(self, request: AddRequest) -> AsyncIterator[TokenDelta]:
        plan = await self.admitted(request)
        run = self.runs[request.request_id] = _Run(request, plan, request, plan.arrived)
        try:
            while True:
                try:
                    stream = self._attempt(run.plan, run.attempt)
                    async with contextlib.aclosing(stream):
                        if run.first_at is None:  # the first token is due within the queue timeout
                            first = await first_delta(stream, run.arrived + self.config.queue_timeout_s,
                                                      run.plan.pending_on, self._too_late)
                            if first is not None:
                                yield self._track(run, first)
                        async for delta in stream:
                            yield self._track(run, delta)
                    break
                except WorkerLost as lost:
                    if not self._move(run, lost):  # every token came; only the finished delta was lost
                        yield TokenDelta(request_id=request.request_id, new_token_ids=[], finished=True,
                                         finish_reason="length", num_prompt_tokens=len(request.prompt_token_ids),
                                         num_cached_tokens=run.cached)
                        return
            self._finish(run)
        finally:
            self.runs.pop(request.request_id, None)
            if run.plan is not None:
                run.plan.release()
            self.wake()

    def route_of(self, request_id: str) -> RouteInfo | None:
        """Where the request runs now (None: its stream is not running)."""
        run = self.runs.get(request_id)
        if run is None or run.plan is None:
            return None
        return run.plan.info(run.migrations)

    def _too_late(self) -> OverloadedError:
        self.metrics.rejected.labels("first_token_timeout").inc()
        return OverloadedError(f"the request waited {self.config.queue_timeout_s:g} s in an overloaded worker's "
                               "queue", retry_after_s=retry_after_s(self.config.queue_timeout_s))

    def _track(self, run: _Run, delta: TokenDelta) -> TokenDelta:
        """Note a delta's tokens (the first one frees its worker's pending prefill); after a move, the
        client still sees its own request: its prompt, its cache hits."""
        if delta.new_token_ids:
            run.output.extend(delta.new_token_ids)
            run.last_at = time.monotonic()
            run.first_at = run.first_at or run.last_at
            if run.plan.pending_on is not None:
                run.plan.first_token()
                self.wake()
        if run.migrations:
            delta = msgspec.structs.replace(delta, num_prompt_tokens=len(run.request.prompt_token_ids),
                                            num_cached_tokens=run.cached)
        run.cached = max(run.cached, delta.num_cached_tokens)
        return delta

    def _move(self, run: _Run, lost: WorkerLost) -> bool:
        """Plan the request's rest elsewhere; False when nothing is left to generate. Raises
        EngineDeadError past `max_migrations`."""
        if run.migrations >= self.config.max_migrations:
            moved = f" (it had moved {run.migrations} times)" if run.migrations else ""
            raise EngineDeadError(f"{lost}{moved}") from None
        run.migrations += 1
        run.plan.release()
        run.plan = None
        run.attempt = resume_request(run.request, run.output)
        if run.attempt is None:
            return False
        run.plan = self.plan(run.attempt, run.arrived, exclude=lost.worker_id)
        run.attempt_start = len(run.output)
        self.metrics.migrations.labels(lost.reason).inc()
        logger.info("request %s moves to %s after %d tokens (%s: %s)", run.request.request_id,
                    run.plan.decode.worker_id, len(run.output), lost.reason, lost)
        return True

    def _finish(self, run: _Run) -> None:
        """Log the request; credit its worker's index with the blocks it now caches."""
        plan = run.plan
        if run.last_at is not None:
            self.request_log.finish(run.arrived, run.first_at, run.last_at, len(run.request.prompt_token_ids),
                                    run.cached, len(run.output))
        # The worker now caches the prompt and output blocks; its KV events say so too, but the
        # conversation's next turn may arrive before them (another socket). Removals correct it.
        # Only the blocks past the prompt's full ones are hashed here: those came with the plan.
        block_size, hashes = self.fleet.block_size, plan.hashes
        tail = run.attempt.prompt_token_ids[len(hashes) * block_size:] + run.output[run.attempt_start:]
        self.fleet.index.store(plan.decode.worker_id,
                               hashes + block_hashes(tail, block_size, hashes[-1] if hashes else ROOT_PARENT_HASH))

    def _attempt(self, plan: Plan, request: AddRequest) -> AsyncIterator[TokenDelta]:
        if plan.prefill is None:
            return self.local(plan.decode, request)
        return self.remote.stream(plan.prefill, plan.decode, request, plan, local=self.local)

    async def local(self, worker: Worker, request: AddRequest) -> AsyncIterator[TokenDelta]:
        """The request run whole on one worker."""
        queued = False
        try:
            async for delta in worker.client.generate(request):
                if not queued and delta.queue_s is not None:
                    queued = True
                    self.metrics.queue_s.observe(delta.queue_s)
                yield delta
        except EngineDeadError as exc:
            raise lost_worker(worker, exc) from None
