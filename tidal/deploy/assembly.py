"""One assembly per process role, shared by every way Tidal starts one.

- frontend: `tidal.frontend.assembly.Frontend` (tokenizer, router replica, HTTP app);
- worker: `worker_spec` builds the `WorkerSpec` a worker process runs from the deployment's
  sections, for the launcher's workers (`tidal serve`: ipc sockets, spawned processes) and for
  `tidal worker` (cluster mode: TCP sockets, NATS events, etcd registration); what differs is only
  the addresses, the KV transfer and the threads, which the caller passes;
- planner: `start_planner` builds and starts the `PlannerService` from a planner section, for
  `tidal serve` (over its launcher and router) and `tidal planner` (over NATS, no router);
  `kubernetes_actuator` is the Kubernetes actuator both may use.
"""

from __future__ import annotations

from tidal.deploy.config import Deployment, PlannerSection, WorkerSection
from tidal.transfer import KVTransferConfig
from tidal.worker.worker import WorkerSpec


def worker_spec(deployment: Deployment, section: WorkerSection, worker_id: str, devices: tuple[str, ...], *,
                request_addr: str, event_addr: str, transfer: KVTransferConfig | None, num_threads: int | None,
                stop_grace_s: float, health_port: int | None = None, log_level: str = "INFO",
                log_format: str = "text", advertise_addr: str | None = None) -> WorkerSpec:
    """The spec of one worker of `section` on `devices` (rank 0's first): its engine config
    resolved from the deployment's engine section and the worker's own (profile tuning included)."""
    return WorkerSpec(worker_id=worker_id, role=section.role,
                      engine=deployment.engine_config(section, devices[0], devices), request_addr=request_addr,
                      event_addr=event_addr, transfer=transfer, num_threads=num_threads, log_level=log_level,
                      log_format=log_format, stats_log_interval_s=section.stats_log_interval_s,
                      stop_grace_s=stop_grace_s, health_port=health_port, advertise_addr=advertise_addr)


def kubernetes_actuator(section: PlannerSection, router=None):
    """The actuator that scales the section's Kubernetes Deployments."""
    from tidal.planner.actuators import KubernetesActuator

    return KubernetesActuator(section.kubernetes.build(), fleet=router)


async def start_planner(section: PlannerSection, router, actuator, registry=None):
    """The planner service the section describes (its SLO, budget, predictor and profile) over
    `router` (None in cluster mode: observations arrive over NATS) and `actuator`, started."""
    from tidal.planner.service import PlannerService

    service = PlannerService(section.planner_config(), router.snapshot if router is not None else None, actuator,
                             router.registry if registry is None else registry, section.make_planner())
    await service.start()
    return service
