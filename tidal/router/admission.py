"""The router's admission: which requests get a worker, which wait, and which are refused (503).

Owns a heap of waiting requests (highest `RoutingHints.priority` first, then oldest) and the plans of
admitted requests whose stream has not started yet. A request is admitted at once when nothing
waits and some worker has room (fewer than `max_pending_prefill_tokens` prompt tokens without a
token back); otherwise it waits until `wake()` (called whenever a worker may have room: a first
token, a finished request, a load report, a worker joining, a drain ending) plans it.

It sheds load by default (`OverloadedError`: 503 with Retry-After), each with its reason in
`tidal_router_rejected_total`:
- `worker_queue_full`: every decode-capable worker has `max_waiting_per_worker` requests queued;
- `wait_estimate`: the request's estimated wait (`wait_estimate.estimate_wait_s`) exceeds
  `queue_timeout_s` (checked on arrival, and again with what is left of its deadline when a queued
  request is about to be planned);
- `queue_full`: `max_queue` requests wait in the router already;
- `queue_timeout`: it waited in the router until its deadline (`queue_timeout_s` after arrival);
- `first_token_timeout` (`first_delta`): the deadline passed with the request still without
  a token on a worker that has a queue; the worker aborts it.
`EngineDeadError` when no worker can serve. An admitted plan whose stream never starts gives its
place back after `PLAN_TTL_S`.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import AsyncIterator, Callable

from tidal.errors import EngineDeadError, OverloadedError
from tidal.protocol import AddRequest, TokenDelta
from tidal.router.config import RouterConfig
from tidal.router.metrics import RouterMetrics
from tidal.router.plan import Plan
from tidal.router.request_log import RequestLog
from tidal.router.wait_estimate import estimate_wait_s, output_tokens_per_request
from tidal.router.workers import Worker, WorkerSet

PLAN_TTL_S = 60.0


def retry_after_s(queue_timeout_s: float) -> int:
    """The Retry-After of every refusal: a quarter of the deadline, 1 to 60 s."""
    return max(1, min(60, round(queue_timeout_s / 4)))


class AdmissionQueue:
    def __init__(self, config: RouterConfig, fleet: WorkerSet, request_log: RequestLog, metrics: RouterMetrics,
                 plan: Callable[[AddRequest, float], Plan]) -> None:
        """`fleet`: the workers (their room, queues and rates); `request_log`: recent finished
        requests (their output lengths); `plan(request, arrived)`: route the request (its bookkeeping
        added to the workers)."""
        self.config = config
        self.max_queue = config.max_queue
        self.queue_timeout_s = config.queue_timeout_s
        self.fleet = fleet
        self.request_log = request_log
        self.metrics = metrics
        self.plan = plan
        self.plans: dict[str, Plan] = {}  # request id -> the plan of an admitted request not yet streaming
        self._queue: list = []  # heap of [-priority, seq, request, future, arrived]
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._queue)

    def take(self, request_id: str) -> Plan | None:
        """The admitted request's plan, handed to its stream (None: not admitted)."""
        return self.plans.pop(request_id, None)

    async def admit(self, request: AddRequest) -> None:
        """Plans the request now, or queues it until a worker has room."""
        if request.request_id in self.plans:
            return
        arrived = time.monotonic()
        self._expire_plans()
        refusal = self.refusal(request, len(self._queue), self.queue_timeout_s)
        if refusal is not None:
            raise refusal
        if not self._queue and self._has_room():
            self.plans[request.request_id] = self.plan(request, arrived)
            return
        if not self.fleet.decoders():
            raise EngineDeadError("no worker is available to serve requests")
        if len(self._queue) >= self.max_queue:
            raise self._refuse("queue_full", f"the server is overloaded: {len(self._queue)} requests are queued")
        future = asyncio.get_running_loop().create_future()
        priority = request.routing.priority if request.routing is not None else 0
        entry = [-priority, next(self._seq), request, future, arrived]
        heapq.heappush(self._queue, entry)
        self.metrics.queue_depth.set(len(self._queue))
        try:
            await asyncio.wait_for(asyncio.shield(future), self.queue_timeout_s)
        except asyncio.TimeoutError:
            raise self._refuse("queue_timeout", f"the request waited {self.queue_timeout_s:g} s for a worker") from None
        finally:
            if not future.done():  # timed out or cancelled (client gone): leave the queue
                future.cancel()
                self._queue.remove(entry)
                heapq.heapify(self._queue)
                self.metrics.queue_depth.set(len(self._queue))
        future.result()  # EngineDeadError if the workers went away while it waited

    def refusal(self, request: AddRequest, queued_ahead: int, budget_s: float) -> OverloadedError | None:
        """Why the request is shed now (counted), or None: every worker's queue is full, or its
        estimated wait behind `queued_ahead` router-queued requests exceeds `budget_s`."""
        config = self.config
        queues = self.fleet.queues()
        if not queues:
            return None
        cap = config.max_waiting_per_worker
        if cap and all(q.waiting >= cap for q in queues):
            return self._refuse("worker_queue_full", f"the server is overloaded: every worker has {cap} or more "
                                "requests queued")
        if config.shed_on_wait_estimate:
            output_tokens = output_tokens_per_request(self.request_log.finished, request.sampling_params.max_tokens)
            wait_s = estimate_wait_s(queued_ahead, queues, output_tokens)
            if wait_s > budget_s:
                return self._refuse("wait_estimate", f"the server is overloaded: the request would wait about "
                                    f"{wait_s:.0f} s for a worker (the limit is {budget_s:.0f} s)")
        return None

    def _refuse(self, reason: str, message: str) -> OverloadedError:
        self.metrics.rejected.labels(reason).inc()
        return OverloadedError(message, retry_after_s=retry_after_s(self.queue_timeout_s))

    def _has_room(self) -> bool:
        return self.fleet.has_room(self.config.max_pending_prefill_tokens)

    def wake(self) -> None:
        """Plan queued requests (highest priority, then oldest) while some worker has room; one whose
        estimated wait at the workers exceeds what is left of its deadline is refused instead."""
        while self._queue and self._has_room():
            _, _, request, future, arrived = heapq.heappop(self._queue)
            if future.done():
                continue
            refusal = self.refusal(request, 0, arrived + self.queue_timeout_s - time.monotonic())
            if refusal is not None:
                future.set_exception(refusal)
                continue
            try:
                self.plans[request.request_id] = self.plan(request, arrived)
                future.set_result(None)
            except EngineDeadError as exc:
                future.set_exception(exc)
        self.metrics.queue_depth.set(len(self._queue))

    def _expire_plans(self) -> None:
        now = time.monotonic()
        for request_id in [r for r, p in self.plans.items() if now - p.created > PLAN_TTL_S]:
            self.plans.pop(request_id).release()


async def first_delta(stream: AsyncIterator[TokenDelta], deadline: float, worker: Worker | None,
                      refuse: Callable[[], OverloadedError]) -> TokenDelta | None:
    """`stream`'s first delta (None: it ended without one), or `refuse()` raised when it has not come
    by `deadline` (`time.monotonic()`) while `worker` (the one computing its prompt) has a queue: the
    request is most likely still in it. Without a queue there (a long prompt, a slow step) it waits
    on. The caller iterates the rest of `stream` itself and closes it (which aborts the request)."""
    first = asyncio.ensure_future(anext(stream))
    try:
        done, _ = await asyncio.wait({first}, timeout=max(deadline - time.monotonic(), 0.0))
        if not done and worker is not None and worker.waiting > 0:
            raise refuse()
        return await first
    except StopAsyncIteration:
        return None
    finally:
        if not first.done():  # refused (or cancelled): the caller's close of the stream aborts the request
            first.cancel()
            await asyncio.gather(first, return_exceptions=True)