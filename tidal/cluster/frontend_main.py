"""`tidal frontend`: the router and the OpenAI HTTP frontend over the workers etcd lists.

What it owns: an `EtcdDiscovery` (followed, never written except a flipped worker's role), the NATS
event subscriber (load reports, KV events), the `Router` (a `WorkerClient` per worker, over TCP),
the HTTP app, and the planner side of the control plane: an observation publisher and the flip
handler (`tidal.cluster.control`).

Lifecycle: connect to etcd and NATS -> the router follows discovery (workers come, go and change
live) -> the served model name is `--served-model-name`, else the first ready worker's -> serve HTTP
(`/health` answers 200 while a worker that can decode is connected) -> every observation interval
publish the planner's `Observation` -> on SIGINT/SIGTERM: finish open responses, then close in
reverse order.

Flips arrive as `FlipCommand`s and run the local actuator's flip path: drain the worker, `SetRole`
(with the command's scheduler limits), rewrite its etcd record's role, undrain. The flip handler
serves one frontend per command (a NATS queue group); with several frontends the others learn the
role from etcd.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from dataclasses import dataclass

import msgspec

from tidal.cluster.config import ClusterFile
from tidal.cluster.control import ControlPlane
from tidal.protocol import FlipCommand, FlipReply
from tidal.runtime.events import cancel_and_wait
from tidal.runtime.planes import curve_keys, make_discovery, make_event_subscriber

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Limits:
    token_budget: int | None
    max_num_seqs: int | None


class ClusterFleet:
    """What the local actuator's flip path needs of a launcher, over etcd: the new role's scheduler
    limits (from the command) and recording the new role (in the worker's etcd record)."""

    def __init__(self, discovery, limits: _Limits = _Limits(None, None)) -> None:
        self.discovery = discovery
        self.limits = limits

    def role_limits(self, role: str) -> _Limits:
        return self.limits

    async def set_role(self, worker_id: str, role: str) -> None:
        info = next((w for w in self.discovery.list() if w.worker_id == worker_id), None)
        if info is None:
            raise KeyError(f"worker {worker_id} is not in etcd")
        await self.discovery.update(msgspec.structs.replace(info, role=role))


class FlipHandler:
    """Carries out the planner's flips with this frontend's router (see the module docstring)."""

    def __init__(self, router, discovery, collector, drain_timeout_s: float) -> None:
        self.router = router
        self.discovery = discovery
        self.collector = collector
        self.drain_timeout_s = drain_timeout_s

    async def __call__(self, command: FlipCommand) -> FlipReply:
        from tidal.planner.actuators import LocalActuator

        if command.worker_id not in self.router.workers:
            return FlipReply(ok=False, error=f"this frontend has no worker {command.worker_id}")
        fleet = ClusterFleet(self.discovery, _Limits(command.token_budget, command.max_num_seqs))
        actuator = LocalActuator(fleet, self.router, drain_timeout_s=self.drain_timeout_s)
        self.collector.states[command.worker_id] = "flipping"
        try:
            result = await actuator.flip_worker(command.worker_id, command.role)
        except Exception as exc:  # noqa: BLE001 - answered to the planner, which counts it
            logger.error("flip of %s to %s failed: %s", command.worker_id, command.role, exc)
            return FlipReply(ok=False, error=str(exc))
        finally:
            self.collector.states.pop(command.worker_id, None)
        return FlipReply(ok=True, drain_s=result.drain_s, unavailable_s=result.unavailable_s, total_s=result.total_s)


async def publish_observations(control: ControlPlane, collector, frontend_id: str, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            await control.publish_observation(frontend_id, collector.collect())
        except Exception:  # noqa: BLE001 - the next interval tries again
            logger.exception("could not publish a planner observation")


async def serve_frontend(settings: ClusterFile) -> None:
    """Router + HTTP frontend + planner traffic until SIGINT/SIGTERM."""
    from tidal.frontend.assembly import Frontend, FrontendSpec
    from tidal.planner.service import ObservationCollector

    planes = settings.cluster.plane_config()
    deployment = settings.deployment()
    server_config = deployment.server_config()
    interval_s = settings.observation_interval_s or settings.planner.reactive_interval_s
    spec = FrontendSpec(model=settings.model, tokenizer=settings.tokenizer,
                        served_model_name=settings.served_model_name, router=deployment.router_config(),
                        server=server_config)
    frontend_id = f"{socket.gethostname()}-{os.getpid()}"
    discovery = make_discovery(planes)
    control = ControlPlane(planes, f"tidal-frontend-{frontend_id}")
    frontend = None
    tasks: list[asyncio.Task] = []
    try:
        await discovery.start()
        await control.connect()
        frontend = Frontend(spec, discovery, events=make_event_subscriber(planes, ("load", "kv")),
                            client_tag=f"{frontend_id}/", keys=curve_keys(planes))
        await frontend.start(wait_ready=False)  # workers come and go: serve once the model name is known
        await control.share_session_pins(frontend.router)
        collector = ObservationCollector(frontend.router.snapshot)
        await control.serve_flips(FlipHandler(frontend.router, discovery, collector,
                                              settings.planner.drain_timeout_s))
        tasks.append(asyncio.create_task(publish_observations(control, collector, frontend_id, interval_s)))
        logger.info("serving %s on http://%s:%d; workers from etcd %s (namespace %s), events and planner "
                    "traffic over NATS %s", frontend.model_name, server_config.host, server_config.port,
                    ",".join(planes.etcd_endpoints), planes.namespace, planes.nats_url)
        await frontend.serve()
    finally:
        for task in tasks:
            await cancel_and_wait(task)
        await control.close()
        if frontend is not None:
            await frontend.close()
        await discovery.close()
