"""The serving tier of one machine: N API server processes on one HTTP port.

`ApiServerPool` owns, in the launcher process: a socket that reserves the port (bound with
SO_REUSEPORT, never listening: the API servers' own sockets listen), the discovery relay that
serves the launcher's worker table to them, the replica bus's forwarder, a scratch folder for the
metrics files of prometheus_client's multiprocess mode, and the processes themselves.

Lifecycle: `start()` (relay, bus, N processes; returns once every one listens) -> supervision:
a process that exits while the pool runs is reported, every worker is told to abort what it sent
(`ForgetClient`), its live metrics are marked dead, and it is started again after the
`RestartPolicy` backoff (`tidal.deploy.supervisor`, the launcher's policy for workers too),
counted on `tidal_api_server_restarts_total{api_server}`; past the policy's limit it stays down
(the others serve on) -> `stop()`: SIGTERM to each (it finishes open responses for up to the
frontend's graceful-shutdown time), SIGKILL to what lingers, then the relay and the bus close.

What stays global and what is per process: docs/serving-tier.md.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass

import msgspec
import zmq

from tidal.config import RestartConfig
from tidal.deploy.supervisor import RestartPolicy, api_server_restart_counter, exit_reason
from tidal.frontend.api_server import ApiServerSpec, api_server_tag, run_api_server, shared_port_socket
from tidal.frontend.assembly import FrontendSpec
from tidal.protocol import ForgetClient
from tidal.runtime.events import cancel_and_wait

logger = logging.getLogger(__name__)

API_SERVER_HEADER = "x-tidal-api-server"
SUPERVISE_INTERVAL_S = 0.25
START_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 15.0


def default_api_servers(cpu_count: int | None = None) -> int:
    """One API server per four cores, at least one (a 2-core box) and at most eight."""
    cores = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
    return max(1, min(8, cores // 4))


@dataclass
class _ApiServer:
    index: int
    process: multiprocessing.process.BaseProcess
    restarts: int = 0
    restart_at: float | None = None
    down: bool = False  # past the restart policy's limit: not started again
    ready: object = None  # the Event the process sets once it listens
    back: bool = True  # a restarted process was reported listening again


class ApiServerPool:
    def __init__(self, spec: FrontendSpec, count: int, discovery, log_level: str = "info",
                 restarts: RestartConfig | None = None) -> None:
        self.spec = spec
        self.count = count
        self.discovery = discovery
        self.log_level = log_level
        shm = "/dev/shm"
        self.dir = tempfile.mkdtemp(prefix="tidal-api-", dir=shm if os.path.isdir(shm) else None)
        os.makedirs(self.metrics_dir)
        self.port: int | None = None
        self.servers: dict[int, _ApiServer] = {}
        self.relay = None
        self.bus = None
        self._reserve = None
        self._supervisor: asyncio.Task | None = None
        self._ctx = multiprocessing.get_context("spawn")
        self._stopping = False
        self.restart_policy = RestartPolicy(restarts or RestartConfig())
        self.restart_count = None  # the counter, created once the metrics are file-backed (`start`)

    @property
    def metrics_dir(self) -> str:
        """prometheus_client's multiprocess files: every API server's (and the launcher's planner) metrics."""
        return os.path.join(self.dir, "metrics")

    async def start(self) -> None:
        from tidal.router.replicas import ReplicaBusProxy
        from tidal.runtime.discovery_relay import DiscoveryRelay

        server = self.spec.server
        self.restart_count = api_server_restart_counter(None)  # multiprocess mode: the files render it
        self._reserve = shared_port_socket(server.host, server.port)
        self.port = self._reserve.getsockname()[1]
        self.relay = DiscoveryRelay(self.discovery, f"ipc://{self.dir}/relay")
        await self.relay.start()
        self.bus = ReplicaBusProxy(f"ipc://{self.dir}/bus-in", f"ipc://{self.dir}/bus-out")
        readies = [self._spawn(i) for i in range(self.count)]
        await asyncio.gather(*(self._wait_ready(i, ready) for i, ready in enumerate(readies)))
        self._supervisor = asyncio.create_task(self._supervise())
        logger.info("%d API server processes listen on http://%s:%d (pids %s)", self.count, server.host, self.port,
                    ", ".join(str(s.process.pid) for s in self.servers.values()))

    def _spawn(self, index: int):
        spec = ApiServerSpec(
            frontend=_with_port(self.spec, self.port, index), index=index, relay_address=self.relay.address, bus_in_address=self.bus.in_address,
            bus_out_address=self.bus.out_address, metrics_dir=self.metrics_dir, parent_pid=os.getpid(),
            log_level=self.log_level)
        ready = self._ctx.Event()
        process = self._ctx.Process(target=run_api_server, args=(spec, ready), name=f"tidal-api-server-{index}",
                                    daemon=True)
        process.start()
        old = self.servers.get(index)
        self.servers[index] = _ApiServer(index, process, restarts=old.restarts if old else 0, ready=ready,
                                         back=old is None)
        return ready

    async def _wait_ready(self, index: int, ready) -> None:
        process = self.servers[index].process
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready.is_set():
            if not process.is_alive():
                raise RuntimeError(f"API server {index} exited with code {process.exitcode} while starting")
            if time.monotonic() > deadline:
                raise TimeoutError(f"API server {index} did not start in {START_TIMEOUT_S:.0f}s")
            await asyncio.sleep(0.05)

    def stop_on_signals(self) -> asyncio.Event:
        """An event set on SIGINT/SIGTERM. Ctrl-C reaches the API servers too (one process group): the
        pool stops restarting at once, so a process that ends on that signal is not started again."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            self.begin_stop()
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        return stop

    def begin_stop(self) -> None:
        """From now on an API server that exits is not restarted (the deployment is going down)."""
        self._stopping = True

    async def _supervise(self) -> None:
        while not self._stopping:
            await asyncio.sleep(SUPERVISE_INTERVAL_S)
            if self._stopping:
                return
            now = time.monotonic()
            for server in list(self.servers.values()):
                if server.down:
                    continue
                if server.restart_at is not None:
                    if now >= server.restart_at:
                        self._restart(server)
                    continue
                if server.process.is_alive():
                    if not server.back and server.ready.is_set():
                        server.back = True
                        logger.info("API server %d serves again (pid %d)", server.index, server.process.pid)
                    continue
                self._on_exit(server, now)

    def _on_exit(self, server: _ApiServer, now: float) -> None:
        process = server.process
        self.forget(api_server_tag(server.index, process.pid))
        from tidal.frontend.metrics_multiprocess import process_exited

        process_exited(self.metrics_dir, process.pid)
        delay_s = self.restart_policy.on_exit(str(server.index), now)
        if delay_s is None:
            server.down = True
            c = self.restart_policy.config
            logger.error("API server %d (pid %d) %s; its open streams are lost, the others serve; it stays down: "
                         "it was restarted %d times in the last %.0fs (restarts.max_restarts)", server.index,
                         process.pid, exit_reason(process.exitcode), c.max_restarts, c.window_s)
            return
        server.restart_at = now + delay_s
        logger.error("API server %d (pid %d) %s; its open streams are lost, the others serve; restarting it in "
                     "%.1fs", server.index, process.pid, exit_reason(process.exitcode), delay_s)

    def _restart(self, server: _ApiServer) -> None:
        server.restarts += 1
        self._spawn(server.index)
        self.servers[server.index].restarts = server.restarts
        self.restart_count.labels(api_server=str(server.index)).inc()
        logger.info("API server %d restarted (pid %d, restart %d)", server.index,
                    self.servers[server.index].process.pid, server.restarts)

    def forget(self, tag: str) -> None:
        """Every worker aborts the requests of the API server whose sockets carry `tag`."""
        self.relay.forget(tag.encode())
        ctx = zmq.Context.instance()
        raw = msgspec.msgpack.encode(ForgetClient(client_prefix=tag))
        for info in self.discovery.list():
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 500)
            try:
                sock.connect(info.request_addr)
                sock.send(raw, zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                logger.warning("could not tell worker %s to forget %s: %s", info.worker_id, tag, exc)
            finally:
                sock.close()

    async def stop(self) -> None:
        self._stopping = True
        await cancel_and_wait(self._supervisor)
        for server in self.servers.values():
            if server.process.is_alive():
                server.process.terminate()
        await asyncio.gather(*(asyncio.to_thread(s.process.join, STOP_TIMEOUT_S) for s in self.servers.values()))
        for server in self.servers.values():
            if server.process.is_alive():
                logger.warning("API server %d did not stop in %.0fs; killing it", server.index, STOP_TIMEOUT_S)
                server.process.kill()
                await asyncio.to_thread(server.process.join, 5)
        if self.relay is not None:
            await self.relay.close()
        if self.bus is not None:
            self.bus.close()
        if self._reserve is not None:
            self._reserve.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _with_port(spec: FrontendSpec, port: int, index: int) -> FrontendSpec:
    """API server `index`'s spec: the pool's port, and a header that names the process in each response."""
    server = dataclasses.replace(spec.server, port=port,
                                 response_headers=(*spec.server.response_headers, (API_SERVER_HEADER, str(index))))
    return dataclasses.replace(spec, server=server)
