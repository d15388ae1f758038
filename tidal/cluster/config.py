"""The cluster commands' settings: one YAML file (`--config`), command-line flags over it.

The file is a deployment config (`tidal.deploy.config`: model, frontend, disaggregation,
kv_transfer, engine, planner) with a `cluster:` section instead of a `workers:` list, and a
`worker:` section for `tidal worker` (one worker per process; its replicas are the cluster
manager's business). Each command reads the sections it needs and ignores the others, so one
file can serve all three:

    cluster: {etcd: [http://10.0.0.5:2379], nats: nats://10.0.0.5:4222, namespace: prod, lease_ttl_s: 10,
              curve_key_dir: /etc/tidal/curve, nats_auth: {token_file: /etc/tidal/nats/token}}
    model: /models/llama.gguf
    frontend: {host: 0.0.0.0, port: 8000, router: kv}
    disaggregation: {local_prefill_threshold: 512}
    engine: {dtype: bfloat16, token_budget: 512}
    worker: {role: decode, port: 0, device: cpu, num_threads: 4}
    planner: {slo: {ttft_ms: 800, itl_ms: 40}, max_workers: 8, actuator: log}

Flags win over the file: `resolve(path, overrides)` merges the flags given (a nested dict, None
meaning "not given") into the file's data, then validates the whole, so a bad flag is refused
with the same `field: message` lines as a bad file. Everything resolves once, at start.

Where a worker listens (`listen_host`): the host the `worker:` section names, else this pod's
address (`POD_IP`, from the Kubernetes downward API), else this machine's address on the route to
etcd. Every interface (`0.0.0.0`) only when named, and then with a warning.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError

from tidal.runtime.ports import WILDCARD_HOSTS
from tidal.deploy.config import (Deployment, DeploymentError, PlannerSection, ServingSections, WorkerCommon,
                                 WorkerSection, format_validation_error, section_from)
from tidal.config import PlaneConfig, Port, env_str
from tidal.protocol import Role



class ClusterSection(section_from("PlaneSection", PlaneConfig, rename={"etcd_endpoints": "etcd", "nats_url": "nats"})):
    """The `cluster:` section: `tidal.config.PlaneConfig`'s fields, with `etcd` (client URLs,
    `http://HOST:2379`) and `nats` (URL(s), comma-separated) for its endpoints, `curve_key_dir`,
    `etcd_auth` and `nats_auth` for the planes' security."""

    def plane_config(self) -> PlaneConfig:
        return self.build()


class WorkerCommandSection(WorkerCommon):
    role: Role = "both"
    worker_id: str | None = None
    """Its name in discovery; default HOSTNAME-PID (on Kubernetes pass the pod name: the
    Kubernetes actuator marks that pod for deletion)."""
    host: str | None = None
    """Where the request socket, the KV server and the health endpoint bind; None: this pod's
    address (`POD_IP`), else this machine's address towards etcd. `0.0.0.0` (every interface)
    is logged as a warning."""
    port: Port = 0
    """The request socket's port; 0: a free one."""
    advertise_host: str | None = None
    """The host peers dial; default `host`, or for a wildcard `host` this machine's address on the
    route to etcd."""
    kv_port: Port = 0
    """The zmq KV server's port; 0: a free one."""
    health_port: Port | None = None
    """Serve /live and /health (503 while loading or leaving) here, for Kubernetes probes; None: none."""
    device: str = "cpu"


class PlannerCommandSection(PlannerSection):
    actuator: Literal["log", "local", "kubernetes"] = "log"
    """`kubernetes`: adds and removes patch the Deployments' replicas; `log` (and `local`, which
    has no launcher to act on in a cluster): log and count them only. Flips always go to the frontend."""
    host: str = "127.0.0.1"
    """The planner's /metrics and /health endpoint."""
    port: Port = 9091


class ClusterFile(ServingSections):
    cluster: ClusterSection = ClusterSection()
    worker: WorkerCommandSection = WorkerCommandSection()
    planner: PlannerCommandSection = PlannerCommandSection()
    observation_interval_s: float | None = Field(None, gt=0)
    """How often the frontend publishes a planner observation; default planner.reactive_interval_s."""

    def deployment(self) -> Deployment:
        """The deployment view of these settings, for the helpers that resolve engine, router and
        server configs (its one worker is a placeholder; `worker_section` is the real one)."""
        shared = {name: getattr(self, name) for name in ServingSections.model_fields}
        return Deployment(**shared, workers=[WorkerSection(role="both")])

    def worker_section(self) -> WorkerSection:
        return WorkerSection(**{name: getattr(self.worker, name) for name in WorkerCommon.model_fields})


def resolve(path: str | None, overrides: dict, need: tuple[str, ...] = ("etcd", "nats")) -> ClusterFile:
    """The file at `path` (if any) with `overrides` merged in, validated; raises DeploymentError."""
    source = str(path) if path else "command line"
    data: dict = {}
    if path:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as exc:
            raise DeploymentError(f"{path}: cannot read: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise DeploymentError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise DeploymentError(f"{path}: expected a mapping at the top level")
    try:
        settings = ClusterFile.model_validate(_merge(data, overrides))
        settings.cluster.plane_config()  # the namespace's spelling
    except ValidationError as exc:
        raise DeploymentError(format_validation_error(exc, source)) from None
    except ValueError as exc:
        raise DeploymentError(f"{source}: cluster: {exc}") from None
    missing = [name for name in need if not getattr(settings.cluster, name)]
    if missing:
        raise DeploymentError(f"{source}: no {' and no '.join(missing)}: pass " +
                              " and ".join(f"--{name} URL" for name in missing) + " (or set them under cluster:)")
    return settings


def _merge(data: dict, overrides: dict) -> dict:
    """`data` with every non-None leaf of `overrides` put in (nested dicts merged)."""
    out = dict(data)
    for key, value in overrides.items():
        if isinstance(value, dict):
            merged = _merge(out.get(key) or {}, value)
            if merged:
                out[key] = merged
        elif value is not None:
            out[key] = value
    return out


def listen_host(host: str | None, etcd_endpoints: tuple[str, ...]) -> str:
    """Where a worker's listeners bind: `host` when named, else `POD_IP`, else this machine's
    address towards etcd (never every interface unless named)."""
    if host:
        return host
    return env_str("POD_IP") or route_address(etcd_endpoints)


def advertised_host(host: str, etcd_endpoints: tuple[str, ...]) -> str:
    """The host peers dial for a socket bound at `host`: itself, or for a wildcard the address this
    machine uses to reach etcd."""
    return host if host not in WILDCARD_HOSTS else route_address(etcd_endpoints)


def route_address(etcd_endpoints: tuple[str, ...]) -> str:
    """This machine's address on the route to etcd (a UDP connect sends nothing; it only picks
    the route)."""
    from tidal.runtime.etcd_cache import parse_endpoint

    etcd_host, etcd_port = parse_endpoint(etcd_endpoints[0]) if etcd_endpoints else ("8.8.8.8", 53)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect((etcd_host, etcd_port))
            return sock.getsockname()[0]
    except OSError:
        return socket.gethostbyname(socket.gethostname())

