"""Actuators: how a planner decision changes the fleet. One interface, two back ends.

`Actuator` is what the planner service calls: `add_worker(role)`, `remove_worker(worker_id)`,
`flip_worker(worker_id, role)`. Both back ends keep one invariant: nothing is stopped or flipped
while it holds a request. Scale-down and flips drain first (the router stops routing to the
worker and waits until its admitted requests, held KV and KV pulls are all done), so no request
is dropped.

What they drive is given to them as two small interfaces, satisfied structurally by whoever assembles
the process (`tidal.deploy.serve`, `tidal.cluster.frontend_main`): `FleetControl` (the router's
drain, undrain, role flip and wait for a new worker) and `WorkerLauncher` (start, stop and re-role
worker processes: the launcher). The planner imports neither the router nor the launcher.

- `LocalActuator(launcher, fleet, devices)`: worker processes on this machine. Add spawns a worker
  on a free device (CPU workers need none) and waits until the router can route to it; remove
  drains, stops the process and unregisters it; flip drains, sends `SetRole` (the worker keeps its
  weights and KV cache), records the role, and puts it back in routing. A flip reports how long
  the drain took, how long the worker was unavailable for new requests *after* its drain (drain
  finished -> rejoined: the cost of the flip itself), and the whole.
- `KubernetesActuator(config)`: the prefill and decode workers are two Deployments; it patches
  their `spec.replicas` through the API server (in-cluster service account by default). A flip on
  Kubernetes is one replica down on the worker's Deployment and one up on the other: a new pod
  loads the weights again, so it is slower than a local flip and is counted as such. With a fleet
  control (a router) in the same process it drains the worker first and marks its pod as the one to delete
  (`controller.kubernetes.io/pod-deletion-cost`); without one, the pods' termination grace period
  is what protects in-flight requests.
"""

from __future__ import annotations

import logging
import os
import ssl
import time
from dataclasses import dataclass
from typing import Protocol

import httpx

from tidal.config import DRAIN_TIMEOUT_S, WORKER_READY_TIMEOUT_S, env_str
from tidal.protocol import Role

logger = logging.getLogger(__name__)

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
DELETION_COST_ANNOTATION = "controller.kubernetes.io/pod-deletion-cost"


class ActuatorError(RuntimeError):
    """An action that could not be carried out; the fleet is as it was (the worker rejoined)."""


@dataclass(frozen=True)
class FlipResult:
    worker_id: str
    role: Role
    drain_s: float  # stop routing -> the worker holds nothing
    unavailable_s: float  # drain finished -> back in routing with its new role
    total_s: float


class Actuator(Protocol):
    async def add_worker(self, role: Role) -> str:
        """Start a worker of `role`; returns its id once it can take requests."""

    async def remove_worker(self, worker_id: str) -> None:
        """Drain the worker, then stop it."""

    async def flip_worker(self, worker_id: str, role: Role) -> FlipResult:
        """Drain the worker, switch its role, put it back."""


class FleetControl(Protocol):
    """What the actuators need of the router: take a worker out of routing and back, flip its role,
    wait for a new one (`tidal.router.service.Router` is one)."""

    async def wait_worker(self, worker_id: str, timeout_s: float = WORKER_READY_TIMEOUT_S) -> None:
        """Until a newly registered worker can take requests."""

    async def drain(self, worker_id: str, timeout_s: float = DRAIN_TIMEOUT_S) -> float:
        """Route nothing new to the worker; wait until it holds nothing. Returns the seconds it took."""

    def undrain(self, worker_id: str) -> None:
        """Put the worker back in routing."""

    async def set_role(self, worker_id: str, role: Role, token_budget: int | None = None,
                       max_num_seqs: int | None = None) -> None:
        """Flip a drained worker's role, with the new role's scheduler limits."""

    def role_of(self, worker_id: str) -> Role | None:
        """The role of a worker it routes to; None for any other."""


class RoleLimits(Protocol):
    token_budget: int | None
    max_num_seqs: int | None


class WorkerLauncher(Protocol):
    """What the local actuator needs of whoever runs the worker processes (`tidal.deploy.launcher.Launcher`)."""

    async def add_worker(self, role: Role, device: str = "cpu") -> str:
        """Start a worker of `role` on `device`; returns its id once it is registered."""

    async def remove_worker(self, worker_id: str) -> None:
        """Stop a (drained) worker and unregister it."""

    async def set_role(self, worker_id: str, role: Role) -> None:
        """Record a flipped worker's new role (the worker and the router already switched)."""

    def role_limits(self, role: Role) -> RoleLimits:
        """The scheduler limits a worker of `role` runs with."""

    def devices_in_use(self) -> set[str]: ...


class LocalActuator:
    def __init__(self, launcher: WorkerLauncher, fleet: FleetControl, devices: tuple[str, ...] = (),
                 drain_timeout_s: float = DRAIN_TIMEOUT_S, ready_timeout_s: float = WORKER_READY_TIMEOUT_S):
        self.launcher = launcher
        self.fleet = fleet
        self.devices = tuple(devices)  # free devices for added workers; empty: CPU
        self.drain_timeout_s = drain_timeout_s
        self.ready_timeout_s = ready_timeout_s

    def _free_device(self) -> str:
        if not self.devices:
            return "cpu"
        in_use = self.launcher.devices_in_use()
        free = [d for d in self.devices if d not in in_use]
        if not free:
            raise ActuatorError(f"no free device among {', '.join(self.devices)}")
        return free[0]

    async def add_worker(self, role: Role) -> str:
        worker_id = await self.launcher.add_worker(role, self._free_device())
        try:
            await self.fleet.wait_worker(worker_id, self.ready_timeout_s)
        except (TimeoutError, RuntimeError) as exc:
            await self.launcher.remove_worker(worker_id)
            raise ActuatorError(f"added worker {worker_id} never became ready: {exc}") from exc
        logger.info("added worker %s (%s)", worker_id, role)
        return worker_id

    async def remove_worker(self, worker_id: str) -> None:
        await self._drain(worker_id)
        await self.launcher.remove_worker(worker_id)
        logger.info("removed worker %s", worker_id)

    async def flip_worker(self, worker_id: str, role: Role) -> FlipResult:
        started = time.monotonic()
        drain_s = await self._drain(worker_id)
        drained = time.monotonic()
        try:
            limits = self.launcher.role_limits(role)
            await self.fleet.set_role(worker_id, role, token_budget=limits.token_budget,
                                       max_num_seqs=limits.max_num_seqs)
            await self.launcher.set_role(worker_id, role)
        except Exception as exc:
            raise ActuatorError(f"flip of {worker_id} to {role} failed: {exc}") from exc
        finally:
            self.fleet.undrain(worker_id)
        done = time.monotonic()
        result = FlipResult(worker_id, role, drain_s=drain_s, unavailable_s=done - drained, total_s=done - started)
        logger.info("flipped worker %s to %s: drain %.3fs, unavailable %.3fs after it, %.3fs in all", worker_id,
                    role, result.drain_s, result.unavailable_s, result.total_s)
        return result

    async def _drain(self, worker_id: str) -> float:
        try:
            return await self.fleet.drain(worker_id, self.drain_timeout_s)
        except Exception as exc:
            self.fleet.undrain(worker_id)
            raise ActuatorError(f"drain of {worker_id} failed: {exc}") from exc


@dataclass(frozen=True)
class KubernetesConfig:
    namespace: str = "default"
    prefill_deployment: str = "tidal-prefill"
    decode_deployment: str = "tidal-decode"
    base_url: str | None = None
    """The API server; None: in-cluster (KUBERNETES_SERVICE_HOST/PORT, service-account token and CA)."""
    token: str | None = None
    """Bearer token; None: the service account's (in-cluster) or none."""
    timeout_s: float = 10.0


class KubernetesActuator:
    def __init__(self, config: KubernetesConfig, fleet: FleetControl | None = None,
                 transport: httpx.AsyncBaseTransport | None = None):
        """`fleet`: the router of this process, if any (drains before a pod goes)."""
        self.config = config
        self.fleet = fleet
        base_url, token, verify = _api_endpoint(config)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.AsyncClient(base_url=base_url, headers=headers, verify=verify, timeout=config.timeout_s,
                                      transport=transport)

    async def close(self) -> None:
        await self.http.aclose()

    def deployment(self, role: Role) -> str:
        if role == "prefill":
            return self.config.prefill_deployment
        if role == "decode":
            return self.config.decode_deployment
        raise ActuatorError(f"no Deployment for role {role!r} (prefill or decode)")

    def role_of(self, worker_id: str) -> Role:
        """A worker is its pod; a Deployment's pods are named after it (`DEPLOYMENT-<hash>-<hash>`)."""
        for role in ("prefill", "decode"):
            if worker_id.startswith(self.deployment(role) + "-"):
                return role
        role = self.fleet.role_of(worker_id) if self.fleet is not None else None
        if role is not None:
            return role
        raise ActuatorError(f"worker {worker_id} belongs to neither {self.config.prefill_deployment} nor "
                            f"{self.config.decode_deployment}")

    async def replicas(self, role: Role) -> int:
        reply = await self.http.get(self._path(role))
        _check(reply, f"GET deployment {self.deployment(role)}")
        return int(reply.json()["spec"]["replicas"])

    async def scale(self, role: Role, delta: int) -> int:
        """Patch the role's Deployment to its current replicas + delta (never below 0)."""
        replicas = max(0, await self.replicas(role) + delta)
        reply = await self.http.patch(self._path(role), json={"spec": {"replicas": replicas}},
                                      headers={"Content-Type": "application/merge-patch+json"})
        _check(reply, f"PATCH deployment {self.deployment(role)}")
        logger.info("deployment %s: replicas -> %d", self.deployment(role), replicas)
        return replicas

    async def add_worker(self, role: Role) -> str:
        replicas = await self.scale(role, +1)
        return f"{self.deployment(role)}/replica-{replicas}"  # the pod's name is the Deployment's to pick

    async def remove_worker(self, worker_id: str) -> None:
        role = self.role_of(worker_id)
        await self._prepare_removal(worker_id)
        await self.scale(role, -1)

    async def flip_worker(self, worker_id: str, role: Role) -> FlipResult:
        started = time.monotonic()
        old = self.role_of(worker_id)
        drain_s = await self._prepare_removal(worker_id)
        drained = time.monotonic()
        await self.scale(old, -1)
        await self.scale(role, +1)
        done = time.monotonic()
        # The new pod is unavailable until it has loaded the model; that is outside this call.
        return FlipResult(worker_id, role, drain_s=drain_s, unavailable_s=done - drained, total_s=done - started)

    async def _prepare_removal(self, worker_id: str) -> float:
        """Drain the worker through the router (if we have one and it routes to the worker) and make
        its pod the one the ReplicaSet deletes first. Returns the drain's seconds."""
        drain_s = 0.0
        if self.fleet is not None and self.fleet.role_of(worker_id) is not None:
            drain_s = await self.fleet.drain(worker_id)
        reply = await self.http.patch(f"/api/v1/namespaces/{self.config.namespace}/pods/{worker_id}",
                                      json={"metadata": {"annotations": {DELETION_COST_ANNOTATION: "-1000"}}},
                                      headers={"Content-Type": "application/merge-patch+json"})
        if reply.status_code == 404:  # not a pod name (a worker id of another scheme): scale down any
            logger.info("no pod %s to mark for deletion; the ReplicaSet picks one", worker_id)
        else:
            _check(reply, f"PATCH pod {worker_id}")
        return drain_s

    def _path(self, role: Role) -> str:
        return f"/apis/apps/v1/namespaces/{self.config.namespace}/deployments/{self.deployment(role)}"


def _api_endpoint(config: KubernetesConfig) -> tuple[str, str | None, ssl.SSLContext | bool]:
    """(base URL, bearer token, TLS verification) from the config, else from the pod's environment."""
    if config.base_url is not None:
        return config.base_url, config.token, True
    host, port = env_str("KUBERNETES_SERVICE_HOST"), env_str("KUBERNETES_SERVICE_PORT", "443")
    if host is None:
        raise ActuatorError("not running in a Kubernetes pod (no KUBERNETES_SERVICE_HOST); set "
                            "planner.kubernetes.base_url")
    token = config.token
    if token is None:
        with open(os.path.join(SERVICE_ACCOUNT_DIR, "token")) as f:
            token = f.read().strip()
    return f"https://{host}:{port}", token, ssl.create_default_context(cafile=os.path.join(SERVICE_ACCOUNT_DIR,
                                                                                            "ca.crt"))


def _check(reply: httpx.Response, what: str) -> None:
    if reply.status_code >= 400:
        raise ActuatorError(f"{what}: HTTP {reply.status_code}: {reply.text[:200]}")
