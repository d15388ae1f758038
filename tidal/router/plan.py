"""A request's plan: the route the dispatcher chose for it, and the bookkeeping it added to its workers.

A plan is made when the request is admitted (`Dispatcher.plan`) and lives until its stream ends (or,
if the stream never starts, until the admission queue expires it). While it lives, its decode
worker counts one more open request and in-flight request and its prompt's blocks, its prefill
worker (remote prefill) one more in-flight request until the decode side has the KV, and the worker
that prefills counts the request and its uncached prompt tokens as pending until the first token. `release` takes
all of it off again; every step is idempotent except `release` itself, called exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tidal.router.workers import Worker

Route = Literal["agg", "local", "remote"]
"""How a request's prompt is prefilled: `agg` no prefill workers (aggregated serving), `local` on its
decode worker although prefill workers exist (conditional disaggregation chose so), `remote` on a
prefill worker whose KV the decode worker pulls."""


@dataclass(frozen=True, slots=True)
class RouteInfo:
    """Where a request runs, as the frontend's request log reports it (`Router.route_of`)."""

    route: Route
    worker_id: str  # the worker that decodes it (runs it whole unless `route` is remote)
    prefill_worker_id: str | None = None
    migrations: int = 0  # times it moved to another worker mid-stream


@dataclass
class Plan:
    """An admitted request's route, with the bookkeeping it added (removed when it ends)."""

    decode: Worker
    prefill: Worker | None
    hashes: list[int]  # the prompt's full blocks
    uncached: int  # prompt tokens the prefilling worker computes
    blocks: int
    created: float
    arrived: float = 0.0  # when the router first saw it (before any queueing)
    pending_on: Worker | None = None
    pending_tokens: int = 0
    prefill_held: bool = False  # counted in the prefill worker's inflight
    route: Route = "agg"

    def info(self, migrations: int = 0) -> RouteInfo:
        return RouteInfo(self.route, self.decode.worker_id, self.prefill.worker_id if self.prefill else None,
                         migrations)

    def prefill_done(self) -> None:
        """The decode worker has the KV (or the prefill worker is out of the picture)."""
        if self.prefill_held:
            self.prefill_held = False
            self.prefill.inflight -= 1

    def first_token(self) -> None:
        if self.pending_on is not None:
            self.pending_on.first_token(self.pending_tokens)
            self.pending_on = None

    def release(self) -> None:
        self.first_token()
        self.prefill_done()
        self.decode.inflight -= 1
        self.decode.open_requests -= 1
        self.decode.active_blocks -= self.blocks
