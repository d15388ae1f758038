"""`tidal worker`: one worker process that registers itself in etcd and talks over TCP and NATS.

What it owns: the worker loop (`tidal.worker.worker.serve_engine`, the same loop the launcher's
workers run) and a registration thread (an asyncio loop holding an `EtcdDiscovery`, its lease
and keepalive). Addresses: the request socket binds `tcp://HOST:PORT` (a free port for 0) and
is advertised as `tcp://ADVERTISE_HOST:PORT`; events go to NATS subjects named after the worker;
KV moves over the zmq backend's TCP server (the shm and cuda_ipc backends reach only this host,
so they are used only when asked for, with a warning). Every listener (requests, KV, health) binds
the worker's listen host (`tidal.cluster.config.listen_host`: the pod's address by default); with
`cluster.curve_key_dir` the request socket and the KV server take only CURVE clients holding the
cluster's keys (`tidal.curve`).

Lifecycle: bind -> load the engine -> register a `WorkerInfo` (role, model, addresses, KV
endpoint) under the lease: frontends watching etcd connect now -> serve -> SIGTERM or SIGINT ->
the worker loop's own shutdown (graceful where the worker has one) -> delete the record and
revoke the lease -> exit 0. A worker that dies unannounced disappears when its lease runs out
(`cluster.lease_ttl_s`). A flip by the planner rewrites the record's role (the frontend does, under
this worker's lease); the worker's discovery adopts it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import socket
import threading

import torch

from tidal.cluster.config import ClusterFile, advertised_host, listen_host
from tidal.config import rank_devices
from tidal.deploy import assembly
from tidal.logs import configure_logging
from tidal.protocol import WorkerInfo
from tidal.runtime.planes import curve_keys, make_discovery, make_event_publisher
from tidal.runtime.ports import WILDCARD_HOSTS, free_port
from tidal.transfer import KVTransferConfig
from tidal.worker.worker import GPU_WORKER_THREADS, StopFlag, WorkerSpec, serve_engine

logger = logging.getLogger(__name__)

REGISTER_TIMEOUT_S = 30.0
UNREGISTER_TIMEOUT_S = 5.0
CROSS_HOST_BACKENDS = ("zmq", "fake")


class Registration:
    """This worker's record in etcd, kept by an asyncio loop on a daemon thread (the worker loop
    is synchronous). `register` and `close` block the caller until etcd answered (or timed out)."""

    def __init__(self, settings: ClusterFile) -> None:
        self.discovery = make_discovery(settings.cluster.plane_config())
        self.worker_id: str | None = None
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="tidal-etcd", daemon=True)
        self._thread.start()

    def _call(self, coro, timeout_s: float):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def register(self, info: WorkerInfo) -> None:
        self._call(self.discovery.register(info), REGISTER_TIMEOUT_S)
        self.worker_id = info.worker_id
        logger.info("registered in etcd as %s (%s): requests %s, events %s, KV %s", info.worker_id, info.role,
                    info.request_addr, info.event_addr, info.kv_addr or "-")

    def close(self) -> None:
        """Delete the record and revoke the lease (so it goes at once), stop the loop."""
        async def leave() -> None:
            if self.worker_id is not None:
                await self.discovery.unregister(self.worker_id, "stopped")
            await self.discovery.close()

        try:
            self._call(leave(), UNREGISTER_TIMEOUT_S)
            if self.worker_id is not None:
                logger.info("unregistered %s from etcd", self.worker_id)
        except Exception as exc:  # noqa: BLE001 - etcd gone: the lease runs out by itself
            logger.warning("could not unregister from etcd (%s); the lease expires instead",
                           str(exc) or type(exc).__name__)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


def worker_spec(settings: ClusterFile) -> tuple[WorkerSpec, str]:
    """The worker's spec (its listeners bound on its listen host, the request socket advertised on
    its advertised host) and that host."""
    w = settings.worker
    cluster = settings.cluster
    host = listen_host(w.host, tuple(cluster.etcd))
    advertise = w.advertise_host or advertised_host(host, tuple(cluster.etcd))
    port = w.port or free_port(host)
    bind_host = "*" if host in WILDCARD_HOSTS else host
    keys = curve_keys(cluster.plane_config())
    worker_id = w.worker_id or f"{socket.gethostname()}-{os.getpid()}"
    devices = rank_devices(w.device, w.tensor_parallel_size) if w.tensor_parallel_size > 1 else (w.device,)
    spec = assembly.worker_spec(
        settings.deployment(), settings.worker_section(), worker_id, devices, request_addr=f"tcp://{bind_host}:{port}",
        event_addr="", transfer=_transfer_config(settings, advertise, devices[0], host),
        num_threads=w.num_threads or (None if devices[0] == "cpu" else GPU_WORKER_THREADS),
        advertise_addr=f"tcp://{_url_host(advertise)}:{port}", health_port=w.health_port,
        stop_grace_s=w.stop_grace_s)
    transfer = spec.transfer and dataclasses.replace(spec.transfer, zmq_curve=keys)
    spec = dataclasses.replace(spec, health_host="0.0.0.0" if bind_host == "*" else host, curve=keys,
                               transfer=transfer)
    return spec, advertise


def _transfer_config(settings: ClusterFile, advertise: str, device: str, host: str) -> KVTransferConfig | None:
    """The zmq backend over TCP unless another one is named (those reach only this host)."""
    if settings.worker.tensor_parallel_size > 1:
        return None  # tensor-parallel workers run aggregated
    backend = settings.kv_transfer.backend
    if backend == "auto":
        backend = "zmq" if device == "cpu" else "cuda_ipc"
    if backend not in CROSS_HOST_BACKENDS:
        logger.warning("KV transfer backend %s reaches workers on this host only; remote prefills from "
                       "other hosts will fail", backend)
    bind = "*" if host in WILDCARD_HOSTS else host
    return settings.kv_transfer.build(backend=backend, zmq_address=f"tcp://{bind}:{settings.worker.kv_port or '*'}",
                                      zmq_advertise_host=advertise)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def run(settings: ClusterFile, log_level: str = "info", log_format: str = "text") -> int:
    """The `tidal worker` process; returns its exit code."""
    spec, advertise = worker_spec(settings)
    configure_logging(log_level, log_format, f"worker {spec.worker_id}")
    if spec.num_threads:
        torch.set_num_threads(spec.num_threads)
    stop = StopFlag()
    # The worker loop's own shutdown: a graceful leave where the worker has one, else stop after
    # this step. A second signal stops at once either way.
    leave = getattr(stop, "on_sigterm", None) or (lambda *_: setattr(stop, "requested", True))
    signal.signal(signal.SIGTERM, leave)
    signal.signal(signal.SIGINT, leave)
    planes = settings.cluster.plane_config()
    events = make_event_publisher(planes, spec.worker_id, "")
    registration = Registration(settings)

    def make_engine():
        from tidal.engine.factory import build_engine

        engine = build_engine(spec.engine, worker_id=spec.worker_id, transfer_config=spec.transfer,
                              record_kv_events=True)
        transfer = engine.connector.backend
        kv_addr = transfer.source_info().address if transfer is not None else ""
        registration.register(WorkerInfo(
            worker_id=spec.worker_id, role=spec.role, request_addr=spec.advertise_addr, event_addr=events.address,
            pid=os.getpid(), host=advertise, device=spec.engine.model.device, model_name=engine.model_name,
            kv_addr=kv_addr))
        return engine

    logger.info("worker %s (%s) on %s: binding %s, advertised as %s; %s", spec.worker_id, spec.role,
                spec.engine.model.device, spec.request_addr, spec.advertise_addr,
                "CURVE on requests and KV" if spec.curve else "no CURVE keys: plain TCP")
    if spec.health_host == "0.0.0.0":
        logger.warning("listening on every interface (worker.host %s): requests, KV and health are reachable "
                       "from any network this machine is on", settings.worker.host)
    code = 0
    try:
        serve_engine(spec, make_engine, stop, parent_pid=0, events=events)
    except Exception:
        logger.exception("worker failed")
        code = 1
    finally:
        registration.close()
    logger.info("exiting")
    return code
