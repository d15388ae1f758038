"""The router of the fleet simulator: the live router's decisions, made by the same pure functions
(`tidal.router.policy`) on `WorkerView`s built from the simulated workers.

What it owns: the admission queue (requests held until some worker has room), the router's books
on each worker (open requests, prompt tokens sent there without a first token back, prompt blocks of
its open requests, requests that use it), each routed request's `Route`, the round-robin counter and
the seeded random source of the policy's choices.

It follows `tidal.router.service.Router` step by step:
- admission (`admit`, `wake`): a request is routed at once when nothing waits and some active worker
  holds fewer than `max_pending_prefill_tokens` pending prompt tokens; otherwise it waits, first come
  first served (the live queue orders by priority; simulated requests have none), and is routed when a
  first token frees room. With no active decode worker it waits too (the live router refuses it).
- the plan (`plan`): the decode worker by `choose_worker` with the configured policy among active
  decode workers (draining, flipping and starting workers are not candidates; the session's worker
  first, `session_worker`); then `decide_prefill` on the uncached part and, if remote,
  `choose_prefill_worker` among active prefill workers.
- the books: the worker that prefills gets the uncached tokens as pending until the first token; the
  decode worker counts the request open until it finishes; a prefill worker is in use until the KV
  has reached the decode worker. A draining or flipping worker leaves only when no request uses it.

Prefix overlap comes from `FleetWidePrefixIndex`: every worker holds every prefix the workload says
hits (the ideal KV-aware fleet), so the overlap term is the same on every candidate and only load
tells them apart.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass
from typing import Callable

from tidal.router.policy import WorkerView, choose_prefill_worker, choose_worker, decide_prefill
from tidal.sim.fleet_config import FleetConfig
from tidal.sim.fleet_worker import SimRequest, SimWorker


@dataclass
class WorkerBook:
    """The router's counts for one worker (the live router's `_Worker` fields)."""
    open_requests: int = 0
    pending_prefill_tokens: int = 0
    active_blocks: int = 0
    inflight: int = 0


@dataclass
class Route:
    decode: SimWorker
    prefill: SimWorker | None  # None: the decode worker prefills it
    uncached: int  # prompt tokens the prefilling worker computes, by the router's count
    blocks: int  # the prompt's blocks, counted on the decode worker while the request is open
    pending_on: SimWorker | None
    prefill_held: bool


class FleetWidePrefixIndex:
    """Prefix overlap as the workload states it: a request's cached tokens, in whole blocks, on every worker."""

    def __init__(self, block_size: int):
        self.block_size = block_size

    def overlap_blocks(self, request: SimRequest, worker: SimWorker) -> int:
        return request.cached_tokens // self.block_size


def session_worker(request: SimRequest, views: list[WorkerView]) -> WorkerView | None:
    """The request's session worker. Simulated requests carry no session, so none: the live router's
    affinity (`Router._session_worker`) is not a pure policy function yet; this is where the
    simulator calls it once it is."""
    return None


class SimRouter:
    def __init__(self, config: FleetConfig, active: Callable[[str], list[SimWorker]],
                 dispatch: Callable[[SimRequest, Route], None]):
        """`active(role)`: the active workers of a role; `dispatch`: hands a routed request to its workers."""
        self.config = config
        self.disagg = config.disagg()
        self.index = FleetWidePrefixIndex(config.block_size)
        self.active = active
        self.dispatch = dispatch
        self.queue: deque[SimRequest] = deque()
        self.books: dict[str, WorkerBook] = {}
        self.routes: dict[int, Route] = {}
        self.counter = 0
        self.rng = random.Random(config.seed)
        self.wake_needed = False

    def book(self, worker: SimWorker) -> WorkerBook:
        book = self.books.get(worker.worker_id)
        if book is None:
            book = self.books[worker.worker_id] = WorkerBook()
        return book

    def in_use(self, worker: SimWorker) -> bool:
        book = self.books.get(worker.worker_id)
        return book is not None and book.inflight > 0

    def view(self, worker: SimWorker, overlap_blocks: int) -> WorkerView:
        """As the live router's: its own counts, or the worker's report where that is higher."""
        book = self.book(worker)
        bs = self.config.block_size
        return WorkerView(worker.worker_id, worker.role, open_requests=book.open_requests,
                          pending_prefill_tokens=max(book.pending_prefill_tokens, worker.pending_tokens),
                          overlap_blocks=overlap_blocks,
                          active_blocks=max(book.active_blocks, int(worker.context_sum()) // bs),
                          kv_usage=worker.kv_used / self.config.kv_capacity_tokens)

    # ---- admission ------------------------------------------------------------------------------
    def has_room(self) -> bool:
        limit = self.config.max_pending_prefill_tokens
        return any(max(self.book(w).pending_prefill_tokens, w.pending_tokens) < limit
                   for w in self.active("decode") + self.active("prefill"))

    def admit(self, request: SimRequest) -> None:
        if not self.queue and self.active("decode") and self.has_room():
            self._route(request)
        else:
            self.queue.append(request)

    def wake(self) -> None:
        """Route held requests, oldest first, while some worker has room."""
        self.wake_needed = False
        while self.queue and self.active("decode") and self.has_room():
            self._route(self.queue.popleft())

    def _route(self, request: SimRequest) -> None:
        route = self.plan(request)
        self.routes[request.request_id] = route
        self.dispatch(request, route)

    # ---- the plan -------------------------------------------------------------------------------
    def plan(self, request: SimRequest) -> Route:
        """The route of one request, with the books updated for it (the live router's `_plan`)."""
        config, bs, n = self.config, self.config.block_size, request.input_len
        self.counter += 1
        views = [self.view(w, self.index.overlap_blocks(request, w)) for w in self.active("decode")]
        chosen = session_worker(request, views) or choose_worker(
            views, config.policy, n, bs, self.counter, self.rng, config.weights)
        decode = self._worker(self.active("decode"), chosen.worker_id)
        uncached = n - chosen.overlap_blocks * bs
        prefill = None
        prefillers = self.active("prefill")
        if prefillers:
            pviews = [self.view(w, self.index.overlap_blocks(request, w)) for w in prefillers]
            if decide_prefill(uncached, pviews, self.disagg) == "remote":
                pick = choose_prefill_worker(pviews, n, bs, self.rng)
                prefill = self._worker(prefillers, pick.worker_id)
                uncached = n - pick.overlap_blocks * bs
        route = Route(decode, prefill, uncached, blocks=-(-n // bs), pending_on=prefill or decode,
                      prefill_held=prefill is not None)
        self.book(route.pending_on).pending_prefill_tokens += uncached
        book = self.book(decode)
        book.inflight += 1
        book.open_requests += 1
        book.active_blocks += route.blocks
        if prefill is not None:
            self.book(prefill).inflight += 1
        return route

    @staticmethod
    def _worker(workers: list[SimWorker], worker_id: str) -> SimWorker:
        return next(w for w in workers if w.worker_id == worker_id)

    # ---- the books ------------------------------------------------------------------------------
    def first_token(self, request: SimRequest) -> None:
        route = self.routes[request.request_id]
        if route.pending_on is not None:
            self.book(route.pending_on).pending_prefill_tokens -= route.uncached
            route.pending_on = None
            self.wake_needed = bool(self.queue)

    def kv_arrived(self, request: SimRequest) -> SimWorker | None:
        """The decode worker has the KV: the prefill worker is out of the picture (returned)."""
        route = self.routes[request.request_id]
        if not route.prefill_held:
            return None
        route.prefill_held = False
        self.book(route.prefill).inflight -= 1
        return route.prefill

    def release(self, request: SimRequest) -> Route:
        """The request finished: its route's counts come off its workers."""
        self.kv_arrived(request)  # a one-token request finishes on its prefill worker: no KV moves
        route = self.routes.pop(request.request_id)
        book = self.book(route.decode)
        book.inflight -= 1
        book.open_requests -= 1
        book.active_blocks -= route.blocks
        return route
