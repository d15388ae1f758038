"""One API server process of a `tidal serve` with several (`--api-servers N`).

The launcher process (`tidal.deploy.api_servers.ApiServerPool`) spawns N of these. Each one is a
whole frontend (`Frontend`: tokenizer, router replica, HTTP app) whose discovery is the launcher's,
relayed (`RelayDiscovery`); it connects to every worker's request socket and event socket itself,
shares session pins and its request log with the other replicas (`ReplicaBus`), and listens on
the deployment's one HTTP port through its own SO_REUSEPORT socket, so the kernel spreads
connections over the processes.

Its sockets at the workers carry the tag `api_server_tag(index, pid)`: when the process dies, the
launcher has every worker abort what it sent (`ForgetClient`). It exits when its parent goes, on
SIGINT/SIGTERM after open responses finish, and restarts are the launcher's business.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from dataclasses import dataclass

from tidal.frontend.assembly import Frontend, FrontendSpec
from tidal.logs import configure_logging
from tidal.runtime.loop import run as run_loop

logger = logging.getLogger(__name__)

PARENT_POLL_S = 1.0
LISTEN_BACKLOG = 4096


@dataclass(frozen=True)
class ApiServerSpec:
    frontend: FrontendSpec
    index: int
    relay_address: str
    bus_in_address: str
    bus_out_address: str
    metrics_dir: str | None
    parent_pid: int
    log_level: str = "info"


def api_server_tag(index: int, pid: int) -> str:
    """The start of an API server process's socket ids at the workers."""
    return f"api{index}.{pid}/"


def shared_port_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port with SO_REUSEPORT: every API server binds its own, and the
    kernel balances new connections across those that listen. Port 0 takes a free port."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.set_inheritable(False)
    return sock


def run_api_server(spec: ApiServerSpec, ready) -> None:
    """Entry point of the process (multiprocessing target); `ready` (an Event) is set once it listens."""
    configure_logging(spec.log_level, spec.frontend.server.log_format, f"api-server {spec.index}")
    with contextlib.suppress(KeyboardInterrupt):
        run_loop(_serve(spec, ready))


async def _serve(spec: ApiServerSpec, ready) -> None:
    from tidal.frontend.metrics_multiprocess import enable_multiprocess_metrics, start_process_metrics
    from tidal.router.replicas import ReplicaBus
    from tidal.runtime.discovery_relay import RelayDiscovery

    if spec.metrics_dir is not None:
        enable_multiprocess_metrics(spec.metrics_dir)
    tag = api_server_tag(spec.index, os.getpid())
    discovery = RelayDiscovery(spec.relay_address, tag)
    frontend = bus = None
    tasks: list[asyncio.Task] = []
    try:
        await discovery.start()
        frontend = Frontend(spec.frontend, discovery, client_tag=tag)
        await frontend.start()
        bus = ReplicaBus(frontend.router, spec.bus_in_address, spec.bus_out_address, tag)
        await bus.start()
        server = spec.frontend.server
        sock = shared_port_socket(server.host, server.port)
        sock.listen(LISTEN_BACKLOG)  # connections queue from now on, before uvicorn takes the socket
        tasks = [asyncio.create_task(_watch_parent(spec.parent_pid)), start_process_metrics(spec.index)]
        ready.set()
        await frontend.serve([sock])
    finally:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if bus is not None:
            await bus.close()
        if frontend is not None:
            await frontend.close()
        await discovery.close()


async def _watch_parent(parent_pid: int) -> None:
    """The launcher is gone (killed): shut down as on SIGTERM."""
    while os.getppid() == parent_pid:
        await asyncio.sleep(PARENT_POLL_S)
    logger.warning("the launcher process is gone; shutting down")
    signal.raise_signal(signal.SIGTERM)
