"""`tidal planner`: the SLA planner in its own process, fed by a frontend over NATS.

What it owns: the planner service (`tidal.planner.service.PlannerService` without a router: the
pure `Planner` core, its metrics, the one-batch-at-a-time executor), the control-plane connection,
the actuator, and a small HTTP server with `/metrics` (the `tidal_planner_*` series) and `/health`.

Lifecycle: connect to NATS -> serve /metrics -> for each `ObservationMessage` from a frontend it
follows: `step_once(observation)` -> actions: adds and removes go to the actuator (`KubernetesActuator`
with `actuator: kubernetes`, else `LogOnlyActuator`), flips to the frontend as `FlipCommand`s
(`ClusterActuator`) -> SIGINT/SIGTERM: stop.

It hears every frontend: each carries its own share of the traffic, so the planner keeps the
latest observation of each frontend heard within FOLLOW_TIMEOUT_INTERVALS observation intervals and,
whenever the frontend with the smallest id (the clock) reports, steps once on their merge
(`tidal.planner.types.merge_observations`: rates add up, latency percentiles take the worst).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest

from tidal.cluster.config import ClusterFile
from tidal.cluster.control import ControlPlane
from tidal.deploy.assembly import kubernetes_actuator, start_planner
from tidal.planner.actuators import ActuatorError, FlipResult
from tidal.planner.types import Observation, merge_observations
from tidal.protocol import FlipCommand, Role

logger = logging.getLogger(__name__)

FOLLOW_TIMEOUT_INTERVALS = 5
FLIP_REPLY_MARGIN_S = 30.0  # beyond the drain timeout: the SetRole, the etcd write


class LogOnlyActuator:
    """Adds and removes nothing: logs each and counts it in `tidal_planner_log_only_actions_total`
    (what a cluster manager, or an operator, would act on). Flips are not its business."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.actions = Counter("tidal_planner_log_only_actions", "Adds and removes the log-only actuator "
                               "logged instead of carrying out.", ["action", "role"], registry=registry)
        self.count = 0

    async def add_worker(self, role: Role) -> str:
        self.count += 1
        self.actions.labels("add", role).inc()
        logger.warning("log-only actuator: would add a %s worker (start one with `tidal worker --role %s`)",
                       role, role)
        return f"log-only-{self.count}"

    async def remove_worker(self, worker_id: str) -> None:
        self.actions.labels("remove", "-").inc()
        logger.warning("log-only actuator: would remove worker %s (SIGTERM it to let it leave)", worker_id)

    async def flip_worker(self, worker_id: str, role: Role) -> FlipResult:
        raise ActuatorError("the log-only actuator does not flip")


class ClusterActuator:
    """Flips over NATS to the frontend; adds and removes to `scaler`."""

    def __init__(self, control: ControlPlane, scaler, settings: ClusterFile) -> None:
        self.control = control
        self.scaler = scaler
        self.settings = settings
        self.timeout_s = settings.planner.drain_timeout_s + FLIP_REPLY_MARGIN_S

    async def add_worker(self, role: Role) -> str:
        return await self.scaler.add_worker(role)

    async def remove_worker(self, worker_id: str) -> None:
        await self.scaler.remove_worker(worker_id)

    async def flip_worker(self, worker_id: str, role: Role) -> FlipResult:
        token_budget, max_num_seqs = self._limits(role)
        reply = await self.control.request_flip(FlipCommand(worker_id=worker_id, role=role, token_budget=token_budget,
                                                            max_num_seqs=max_num_seqs), self.timeout_s)
        if not reply.ok:
            raise ActuatorError(f"flip of {worker_id} to {role}: {reply.error}")
        logger.info("frontend flipped %s to %s: drain %.3fs, unavailable %.3fs after it", worker_id, role,
                    reply.drain_s, reply.unavailable_s)
        return FlipResult(worker_id, role, drain_s=reply.drain_s, unavailable_s=reply.unavailable_s,
                          total_s=reply.total_s)

    def _limits(self, role: Role) -> tuple[int | None, int | None]:
        """The role's scheduler limits when the config's engine section sets them (a profile
        included); else None: the worker keeps its own."""
        from tidal.deploy.engine_knobs import resolve_role_limits

        engine = self.settings.engine.merged(self.settings.worker.engine)
        if engine.token_budget is None and engine.max_num_seqs is None and engine.profile is None:
            return None, None
        limits = resolve_role_limits(role, engine.knobs())
        return limits.token_budget, limits.max_num_seqs


def make_scaler(settings: ClusterFile, registry: CollectorRegistry):
    section = settings.planner
    if section.actuator == "kubernetes":
        return kubernetes_actuator(section)
    if section.actuator == "local":
        logger.warning("actuator local: a cluster planner has no launcher; adds and removes are only logged")
    return LogOnlyActuator(registry)


class FrontendMerger:
    """The frontends the planner hears and their latest observations (see the module docstring)."""

    def __init__(self, interval_s: float) -> None:
        self.timeout_s = FOLLOW_TIMEOUT_INTERVALS * interval_s
        self.latest: dict[str, tuple[float, Observation]] = {}  # frontend id -> (heard at, observation)
        self.last_heard = 0.0

    def accept(self, frontend_id: str, observation: Observation, now: float) -> Observation | None:
        """The merged observation to step on, when `frontend_id` is the clock frontend; else None."""
        if frontend_id not in self.latest:
            logger.info("planner: hearing frontend %s", frontend_id)
        self.latest[frontend_id] = (now, observation)
        self.last_heard = now
        for quiet in [f for f, (heard, _) in self.latest.items() if now - heard > self.timeout_s]:
            logger.info("planner: frontend %s went quiet", quiet)
            del self.latest[quiet]
        clock = min(self.latest)
        if frontend_id != clock:
            return None
        ordered = [self.latest[clock][1]] + [obs for f, (_, obs) in sorted(self.latest.items()) if f != clock]
        return merge_observations(ordered)


async def serve_metrics(registry: CollectorRegistry, host: str, port: int, healthy):
    """/metrics and /health on host:port; returns the aiohttp runner (cleanup() to stop)."""
    from aiohttp import web

    async def metrics(_request):
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def health(_request):
        return web.json_response({"status": "ok" if healthy() else "no observations yet"},
                                 status=200 if healthy() else 503)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/health", health)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


async def serve_planner(settings: ClusterFile) -> None:
    planes = settings.cluster.plane_config()
    section = settings.planner
    registry = CollectorRegistry()
    observations = Counter("tidal_planner_observations", "Observations received from the frontend.",
                           registry=registry)
    control = ControlPlane(planes, "tidal-planner")
    scaler = make_scaler(settings, registry)
    service = None
    follower = FrontendMerger(settings.observation_interval_s or section.reactive_interval_s)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    runner = None
    try:
        await control.connect()
        runner = await serve_metrics(registry, section.host, section.port,
                                     lambda: time.monotonic() - follower.last_heard < follower.timeout_s)
        service = await start_planner(section, None, ClusterActuator(control, scaler, settings), registry)
        logger.info("planner: metrics on http://%s:%d/metrics; actuator %s; observations from NATS %s "
                    "(namespace %s)", section.host, section.port, type(scaler).__name__, planes.nats_url,
                    planes.namespace)
        consume = asyncio.create_task(_consume(control, service, follower, observations))
        await stop.wait()
        consume.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await consume
    finally:
        if service is not None:
            await service.close()
        if runner is not None:
            await runner.cleanup()
        if hasattr(scaler, "close"):
            await scaler.close()
        await control.close()


async def _consume(control: ControlPlane, service, follower: FrontendMerger, observations: Counter) -> None:
    async for frontend_id, observation in control.observations():
        observations.inc()
        merged = follower.accept(frontend_id, observation, time.monotonic())
        if merged is None:
            continue
        try:
            service.step_once(merged)
        except Exception:  # noqa: BLE001 - a planner bug must not stop the planner process
            logger.exception("planner step failed")
