"""The router's admission queue: requests wait here while every worker is full.

Owns a heap of waiting requests (highest `RoutingHints.priority` first, then oldest) and the plans of
admitted requests whose stream has not started yet. A request is admitted at once when nothing
waits and some worker has room (fewer than `max_pending_prefill_tokens` prompt tokens without a
token back); otherwise it waits until `wake()` (called whenever a worker may have room: a first
token, a finished request, a load report, a worker joining, a drain ending) plans it. Refused with
`OverloadedError` (503, Retry-After) when `max_queue` wait already or it waits past
`queue_timeout_s`; with `EngineDeadError` when no worker can serve. An admitted plan whose stream
never starts gives its place back after `PLAN_TTL_S`.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable

from tidal.errors import EngineDeadError, OverloadedError
from tidal.protocol import AddRequest
from tidal.router.plan import Plan
from tidal.router.metrics import RouterMetrics

PLAN_TTL_S = 60.0


class AdmissionQueue:
    def __init__(self, max_queue: int, queue_timeout_s: float, metrics: RouterMetrics,
                 has_room: Callable[[], bool], can_serve: Callable[[], bool],
                 plan: Callable[[AddRequest, float], Plan]) -> None:
        """`has_room`: some worker takes one more prompt now; `can_serve`: some worker can decode at
        all; `plan(request, arrived)`: route the request (its bookkeeping added to the workers)."""
        self.max_queue = max_queue
        self.queue_timeout_s = queue_timeout_s
        self.metrics = metrics
        self.has_room = has_room
        self.can_serve = can_serve
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
        if not self._queue and self.has_room():
            self.plans[request.request_id] = self.plan(request, arrived)
            return
        if not self.can_serve():
            raise EngineDeadError("no worker is available to serve requests")
        if len(self._queue) >= self.max_queue:
            self.metrics.rejected.labels("queue_full").inc()
            raise OverloadedError(f"the server is overloaded: {len(self._queue)} requests are queued",
                                  retry_after_s=self.retry_after_s())
        future = asyncio.get_running_loop().create_future()
        priority = request.routing.priority if request.routing is not None else 0
        entry = [-priority, next(self._seq), request, future, arrived]
        heapq.heappush(self._queue, entry)
        self.metrics.queue_depth.set(len(self._queue))
        try:
            await asyncio.wait_for(asyncio.shield(future), self.queue_timeout_s)
        except asyncio.TimeoutError:
            self.metrics.rejected.labels("queue_timeout").inc()
            raise OverloadedError(f"the request waited {self.queue_timeout_s:g} s for a worker",
                                  retry_after_s=self.retry_after_s()) from None
        finally:
            if not future.done():  # timed out or cancelled (client gone): leave the queue
                future.cancel()
                self._queue.remove(entry)
                heapq.heapify(self._queue)
                self.metrics.queue_depth.set(len(self._queue))
        future.result()  # EngineDeadError if the workers went away while it waited

    def retry_after_s(self) -> int:
        return max(1, min(60, round(self.queue_timeout_s / 4)))

    def wake(self) -> None:
        """Plan queued requests (highest priority, then oldest) while some worker has room."""
        while self._queue and self.has_room():
            _, _, request, future, arrived = heapq.heappop(self._queue)
            if future.done():
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
