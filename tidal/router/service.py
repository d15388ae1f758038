"""The router: the frontend's `EngineClient` over every worker that discovery lists.

`Router` is a thin facade over parts with one owner each:
- `workers.WorkerSet`: the workers (following discovery, their load reports and KV events, the KV
  index and its resyncs) and the router's bookkeeping of what it sent where;
- `roles.RoleControl`: drain, undrain and role flips (what the planner's actuators drive);
- `admission.AdmissionQueue`: requests waiting for a worker with room, and load shedding (503 when
  the router's queue or every worker's queue is full, or the estimated wait, `wait_estimate.py`, is
  past the deadline);
- `dispatch.Dispatcher`: where a request runs (session, policy, local or remote prefill) and its
  stream from there, moving it when its worker goes away (`remote.py`, `migration.py`);
- `metrics.RouterMetrics`: the Prometheus collectors; `sessions.SessionTable`: session pins;
  `request_log.RequestLog`: finished requests for the planner.
The routing decisions themselves are pure functions (`policy.py`).

One request: `admit` (queue while every worker is over its pending-prefill limit; 503 with
Retry-After when a queue is full or the wait would pass its deadline), then `generate` (503 too
when its deadline passes with the request still queued on a worker). A worker that
leaves (SIGTERM: `WorkerLeaving`) is drained at once: nothing new goes to it; what it has finishes
there within its grace period or moves when it exits.

What it publishes: `snapshot()`, a frozen `FleetSnapshot` (workers, queue, arrivals, finished
requests) that the planner reads instead of the router's state.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

from tidal.config import DRAIN_TIMEOUT_S, FLEET_READY_TIMEOUT_S, WORKER_READY_TIMEOUT_S
from tidal.fleet_snapshot import FleetSnapshot
from tidal.protocol import AddRequest, EngineStats, Role, TokenDelta
from tidal.router.admission import AdmissionQueue
from tidal.router.config import RouterConfig
from tidal.router.dispatch import Dispatcher
from tidal.router.index import KVIndex
from tidal.router.metrics import RouterMetrics
from tidal.router.plan import Plan, RouteInfo
from tidal.router.request_log import RequestLog
from tidal.router.roles import RoleControl
from tidal.router.sessions import SessionTable
from tidal.router.workers import Worker, WorkerSet
from tidal.curve import CurveKeys
from tidal.runtime.discovery import Discovery
from tidal.runtime.events import EventSubscriber, ZmqEventSubscriber


class Router:
    def __init__(self, discovery: Discovery, config: RouterConfig = RouterConfig(),
                 events: EventSubscriber | None = None, client_tag: str = "", keys: CurveKeys | None = None):
        """`events`: the event plane's subscriber (`tidal.runtime.planes.make_event_subscriber`, with
        topics `load` and `kv`); None: ZMQ, connecting to each worker's `event_addr`. `client_tag`
        starts this replica's socket ids at every worker (`WorkerClient`); `keys`: they dial the
        workers with CURVE (cluster mode with `curve_key_dir`)."""
        self.config = config
        self.discovery = discovery
        self.metrics = RouterMetrics()
        self.index = KVIndex()
        self.request_log = RequestLog()
        self.sessions = SessionTable()
        events = events if events is not None else ZmqEventSubscriber(("load", "kv"))
        self.fleet = WorkerSet(discovery, events, self.index, client_tag, on_resync=self.metrics.resyncs.inc,
                               on_change=self._wake, keys=keys)
        self.metrics.watch_workers(self.fleet.workers)
        self.roles = RoleControl(self.fleet, on_change=self._wake)
        self.dispatcher = Dispatcher(config, self.fleet, self.sessions, self.metrics, self.request_log,
                                     admitted=self._admitted, wake=self._wake)
        self.admission = AdmissionQueue(config, self.fleet, self.request_log, self.metrics, plan=self.dispatcher.plan)
        self.replica_queue_depth: Callable[[], int] | None = None  # what the API servers' routers queue

    # ---- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        await self.fleet.start()

    async def wait_ready(self, timeout_s: float = FLEET_READY_TIMEOUT_S) -> None:
        """Until every listed worker is connected (or gone); then at least one must decode."""
        await self.fleet.wait_ready(timeout_s)

    async def close(self) -> None:
        await self.fleet.close()

    # ---- EngineClient --------------------------------------------------------------------------
    def generate(self, request: AddRequest) -> AsyncIterator[TokenDelta]:
        """The request's deltas (admitted first if `admit` was not called), moved to another worker
        if its worker goes away mid-stream."""
        return self.dispatcher.generate(request)

    async def admit(self, request: AddRequest) -> None:
        """Routes the request now, or queues it until a worker has room. Raises OverloadedError
        (queue full, or waited past `queue_timeout_s`) or EngineDeadError (no worker)."""
        if request.request_id not in self.admission.plans:
            self.request_log.arrived()
            await self.admission.admit(request)

    async def _admitted(self, request: AddRequest) -> Plan:
        plan = self.admission.take(request.request_id)
        if plan is None:
            await self.admit(request)
            plan = self.admission.take(request.request_id)
        return plan

    async def abort(self, request_id: str) -> None:
        for worker in self.fleet.workers.values():
            await worker.client.abort(request_id)

    @property
    def max_model_len(self) -> int:
        return self.fleet.max_model_len or 0

    @property
    def model_name(self) -> str:
        return self.fleet.model_name or ""

    def is_healthy(self) -> bool:
        return bool(self.fleet.decoders())

    def readiness(self) -> tuple[bool, dict]:
        """Ready to serve: at least one routable worker that decodes (role both or decode); prefill
        workers are optional (without them prompts prefill on their decode worker). The dict counts
        routable workers by role, for the health endpoint's answer."""
        roles = self.fleet.routable_by_role()
        return roles["both"] + roles["decode"] > 0, roles

    @property
    def queue_length(self) -> int:
        """Requests waiting in the router for a worker with room (the other replicas' too, for the
        planner's control router: `replica_queue_depth`)."""
        others = self.replica_queue_depth() if self.replica_queue_depth is not None else 0
        return len(self.admission) + others

    def route_of(self, request_id: str) -> RouteInfo | None:
        """Where an admitted request runs (its route, decode and prefill workers, moves so far), for the
        frontend's request log; None once its stream has ended, or when it was never admitted."""
        route = self.dispatcher.route_of(request_id)
        if route is None:
            plan = self.admission.plans.get(request_id)
            route = plan.info() if plan is not None else None
        return route

    def stats(self) -> EngineStats | None:
        return self.fleet.stats()

    def worker_table(self) -> list[dict]:
        """Each worker's role and latest load report (the admin endpoint's answer)."""
        return self.fleet.table()

    @property
    def workers(self) -> dict[str, Worker]:
        return self.fleet.workers

    def _wake(self) -> None:
        self.admission.wake()

    # ---- sessions (shared with the other replicas) -----------------------------------------------
    def pin_session(self, session_id: str, worker_id: str) -> None:
        """Keep the session's requests on `worker_id` (a pin made here or by another replica)."""
        self.sessions.pin(session_id, worker_id)

    @property
    def on_session_pinned(self) -> Callable[[str, str], None] | None:
        """Called with (session id, worker id) when this router pins a session to a new worker."""
        return self.dispatcher.on_session_pinned

    @on_session_pinned.setter
    def on_session_pinned(self, callback: Callable[[str, str], None] | None) -> None:
        self.dispatcher.on_session_pinned = callback

    # ---- fleet control (`tidal.planner.actuators.FleetControl`) --------------------------------
    async def wait_worker(self, worker_id: str, timeout_s: float = WORKER_READY_TIMEOUT_S) -> None:
        await self.roles.wait_worker(worker_id, timeout_s)

    async def drain(self, worker_id: str, timeout_s: float = DRAIN_TIMEOUT_S) -> float:
        return await self.roles.drain(worker_id, timeout_s)

    def undrain(self, worker_id: str) -> None:
        self.roles.undrain(worker_id)

    def is_draining(self, worker_id: str) -> bool:
        return self.roles.is_draining(worker_id)

    async def set_role(self, worker_id: str, role: Role, token_budget: int | None = None,
                       max_num_seqs: int | None = None) -> None:
        await self.roles.set_role(worker_id, role, token_budget=token_budget, max_num_seqs=max_num_seqs)

    def role_of(self, worker_id: str) -> Role | None:
        return self.roles.role_of(worker_id)

    # ---- what it publishes ---------------------------------------------------------------------
    def snapshot(self) -> FleetSnapshot:
        """The fleet as this router sees it now (the planner's one view of it)."""
        return FleetSnapshot(time_s=time.monotonic(), workers=self.fleet.snapshot(), queue_depth=self.queue_length,
                             arrivals_total=self.request_log.arrivals_total,
                             finished=tuple(self.request_log.finished))

    @property
    def registry(self):
        return self.metrics.registry

    @property
    def live_collectors(self) -> tuple:
        return self.metrics.live_collectors
