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

from tidal.protocol import Role
from tidal.router.policy import WorkerView, choose_prefill_worker, choose_worker, decide_prefill, session_worker
from tidal.sim.fleet_config import FleetConfig
from tidal.sim.fleet_worker import SimRequest, SimWorker


@dataclass
class WorkerBook:
    """The router's counts for one worker (the live router's `_Worker` fields) and the worker's last
    load report."""
    open_requests: int = 0
    pending_prefill_tokens: int = 0
    active_blocks: int = 0
    inflight: int = 0
    reported_pending_tokens: int = 0
    reported_blocks: int = 0
    kv_usage: float = 0.0


@dataclass
class Route:
    decode: SimWorker
    prefill: SimWorker | None  # None: the decode worker prefills it
    uncached: int  # prompt tokens the prefilling worker computes, by the router's count
    blocks: int  # the prompt's blocks, counted on the decode worker while the request is open
    pending_on: SimWorker | None
    prefill_held: bool


class FleetWidePrefixIndex:
    """Prefix overlap as the workload states it: a request's cached tokens, in whole blocks, on every
    worker. `overlaps` answers as the live `KVIndex.overlaps` does (worker id -> blocks), plus the
    blocks of every worker it does not name: here it names none."""

    def __init__(self, block_size: int):
        self.block_size = block_size

    def overlaps(self, request: SimRequest) -> tuple[dict[str, int], int]:
        return {}, request.cached_tokens // self.block_size


class SimRouter:
    def __init__(self, config: FleetConfig, active: Callable[[str], list[SimWorker]],
                 dispatch: Callable[[SimRequest, Route], None]):
        """`active(role)`: the active workers of a role (the same list until the set changes);
        `dispatch`: hands a routed request to its workers."""
        self.config = config
        self.disagg = config.disagg_policy()
        self.index = FleetWidePrefixIndex(config.block_size)
        self.active = active
        self.dispatch = dispatch
        self.queue: deque[SimRequest] = deque()
        self.books: dict[str, WorkerBook] = {}
        self.routes: dict[int, Route] = {}
        self.counter = 0
        self.rng = random.Random(config.seed)
        self.wake_needed = False
        # One WorkerView per worker, kept current as books and reports change (building them per
        # decision would cost more than the decision); the candidate lists follow `active`'s lists.
        self._views: dict[str, WorkerView] = {}
        self._workers: dict[str, SimWorker] = {}
        self._candidates: dict[str, tuple[list[SimWorker], list[WorkerView]]] = {}

    def book(self, worker: SimWorker) -> WorkerBook:
        book = self.books.get(worker.worker_id)
        if book is None:
            book = self.books[worker.worker_id] = WorkerBook()
            self._views[worker.worker_id] = WorkerView(worker.worker_id, worker.role)
            self._workers[worker.worker_id] = worker
        return book

    def in_use(self, worker: SimWorker) -> bool:
        book = self.books.get(worker.worker_id)
        return book is not None and book.inflight > 0

    def report(self, worker: SimWorker) -> None:
        """The worker's load report after one of its events (a live worker sends one with every
        step's outputs): its pending prompt tokens, the KV blocks its batch holds, its KV use."""
        book = self.book(worker)
        book.reported_pending_tokens = worker.pending_tokens
        book.reported_blocks = int(worker.context_sum()) // self.config.block_size
        book.kv_usage = worker.kv_used / self.config.kv_capacity_tokens
        self._refresh(worker)

    def _refresh(self, worker: SimWorker) -> None:
        """The worker's view: the router's own counts, or the worker's report where that is higher."""
        book, view = self.book(worker), self._views[worker.worker_id]
        view.role = worker.role
        view.open_requests = book.open_requests
        view.pending_prefill_tokens = max(book.pending_prefill_tokens, book.reported_pending_tokens)
        view.active_blocks = max(book.active_blocks, book.reported_blocks)
        view.kv_usage = book.kv_usage

    def _views_of(self, role: Role, request: SimRequest) -> list[WorkerView]:
        """The active workers of `role` as views, with this request's prefix overlap on each."""
        workers = self.active(role)
        cached = self._candidates.get(role)
        if cached is None or cached[0] is not workers:
            for w in workers:
                self._refresh(w)
            cached = self._candidates[role] = (workers, [self._views[w.worker_id] for w in workers])
        named, default = self.index.overlaps(request)
        for view in cached[1]:
            view.overlap_blocks = named.get(view.worker_id, default) if named else default
        return cached[1]

    # ---- admission ------------------------------------------------------------------------------
    def has_room(self) -> bool:
        limit = self.config.max_pending_prefill_tokens
        for role in ("decode", "prefill"):
            for worker in self.active(role):
                self.book(worker)
                if self._views[worker.worker_id].pending_prefill_tokens < limit:
                    return True
        return False

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
        views = self._views_of("decode", request)
        # Simulated requests carry no session, so no worker is pinned: the policy chooses.
        chosen = session_worker(views, None, config.max_pending_prefill_tokens) or choose_worker(
            views, config.policy, n, bs, self.counter, self.rng, config.weights)
        decode = self._worker(chosen)
        uncached = n - chosen.overlap_blocks * bs
        prefill = None
        pviews = self._views_of("prefill", request)
        if pviews and decide_prefill(uncached, pviews, self.disagg) == "remote":
            pick = choose_prefill_worker(pviews, n, bs, self.rng)
            prefill = self._worker(pick)
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
            self._refresh(prefill)
        self._refresh(decode)
        return route

    def _worker(self, chosen: WorkerView) -> SimWorker:
        """The simulated worker behind a chosen view."""
        return self._workers[chosen.worker_id]

    # ---- the books ------------------------------------------------------------------------------
    def first_token(self, request: SimRequest) -> None:
        route = self.routes[request.request_id]
        if route.pending_on is not None:
            self.book(route.pending_on).pending_prefill_tokens -= route.uncached
            self._refresh(route.pending_on)
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
        self._refresh(route.decode)
        return route
