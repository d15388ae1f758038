"""The launcher: starts every worker of a deployment on this machine, watches them, stops them.

Owns the worker processes and a scratch folder (in /dev/shm when there is one) that holds their
socket files and shared-memory KV caches. Each worker is registered in discovery as soon as it
is spawned (clients connect and wait for its `WorkerReady`); a worker that exits on its own is
reported, unregistered (so its open requests fail at once with a clear error, and routing stops
choosing it) and its files are removed. `stop()` sends SIGTERM to every worker, waits, kills
what is left, and removes the folder.

`serve_deployment` is `tidal serve -f CONFIG.yaml`: launcher + router + HTTP frontend in this
process, everything torn down in reverse order on Ctrl-C/SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass

from tidal.deploy.config import Deployment
from tidal.protocol import WorkerInfo
from tidal.runtime.discovery import Discovery, LocalDiscovery
from tidal.worker.worker import WorkerSpec, run_worker

logger = logging.getLogger(__name__)

SUPERVISE_INTERVAL_S = 0.2
STOP_TIMEOUT_S = 15.0


@dataclass
class _Proc:
    spec: WorkerSpec
    info: WorkerInfo
    process: multiprocessing.process.BaseProcess
    reported: bool = False


class Launcher:
    def __init__(self, deployment: Deployment, discovery: Discovery | None = None, log_level: str = "INFO"):
        self.deployment = deployment
        self.discovery = discovery or LocalDiscovery()
        self.log_level = log_level
        self.procs: dict[str, _Proc] = {}
        self.dir: str | None = None
        self._supervisor: asyncio.Task | None = None
        self._stopping = False

    async def start(self) -> None:
        shm = "/dev/shm"
        self.dir = tempfile.mkdtemp(prefix="tidal-", dir=shm if os.path.isdir(shm) else None)
        groups = self.deployment.worker_groups()
        num_cpu_ranks = sum(devices.count("cpu") for _, _, devices in groups) or 1
        default_threads = max(1, (os.cpu_count() or 1) // num_cpu_ranks)
        transfer = self.deployment.transfer_config(self.dir)
        mp = multiprocessing.get_context("spawn")
        for worker_id, section, devices in groups:
            device, tp = devices[0], section.tensor_parallel_size
            spec = WorkerSpec(
                worker_id=worker_id, role=section.role, engine=self.deployment.engine_config(section, device, devices),
                request_addr=f"ipc://{self.dir}/{worker_id}.req", event_addr=f"ipc://{self.dir}/{worker_id}.ev",
                transfer=transfer if tp == 1 else None,  # tensor-parallel workers run aggregated, for now
                num_threads=section.num_threads or (default_threads if device == "cpu" else None),
                log_level=self.log_level)
            # A daemonic process may not start processes, and a tensor-parallel worker starts its other ranks.
            process = mp.Process(target=run_worker, args=(spec,), name=f"tidal-{worker_id}", daemon=tp == 1)
            process.start()
            info = WorkerInfo(worker_id=worker_id, role=section.role, request_addr=spec.request_addr,
                              event_addr=spec.event_addr, pid=process.pid, host=socket.gethostname(),
                              device=device)
            self.procs[worker_id] = _Proc(spec, info, process)
            await self.discovery.register(info)
            logger.info("started worker %s (role=%s, device=%s, pid=%d)", worker_id, section.role, ",".join(devices),
                        process.pid)
        self._supervisor = asyncio.create_task(self._supervise())

    async def _supervise(self) -> None:
        while True:
            await asyncio.sleep(SUPERVISE_INTERVAL_S)
            for worker_id, proc in self.procs.items():
                if proc.reported or proc.process.is_alive():
                    continue
                proc.reported = True
                reason = f"exited with code {proc.process.exitcode}"
                logger.error("worker %s (role=%s) %s; its requests fail and it gets no new ones",
                             worker_id, proc.spec.role, reason)
                await self.discovery.unregister(worker_id, reason)
                self._remove_files(worker_id)

    def kill_worker(self, worker_id: str) -> None:
        """SIGKILL one worker (fault tests); supervision reports it like any other death."""
        self.procs[worker_id].process.kill()

    async def stop(self) -> None:
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        for proc in self.procs.values():
            if proc.process.is_alive():
                proc.process.terminate()  # SIGTERM: the worker finishes its step and closes
        await asyncio.gather(*(asyncio.to_thread(p.process.join, STOP_TIMEOUT_S) for p in self.procs.values()))
        for worker_id, proc in self.procs.items():
            if proc.process.is_alive():
                logger.warning("worker %s did not stop in %.0fs; killing it", worker_id, STOP_TIMEOUT_S)
                proc.process.kill()
                await asyncio.to_thread(proc.process.join, 5)
            if not proc.reported:
                proc.reported = True
                await self.discovery.unregister(worker_id, "stopped")
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _remove_files(self, worker_id: str) -> None:
        if self.dir is None:
            return
        for name in os.listdir(self.dir):
            if name.startswith(f"{worker_id}.") or name.startswith(f"kv-{worker_id}-"):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.dir, name))


async def serve_deployment(deployment: Deployment, host: str | None = None, port: int | None = None) -> None:
    """Launcher + router + HTTP frontend until SIGINT/SIGTERM; then everything stops."""
    from tidal.frontend.app import build_app, serve_http
    from tidal.router.service import Router
    from tidal.tokenizer import load_tokenizer

    server_config = deployment.server_config(host, port)
    tokenizer = load_tokenizer(deployment.model, deployment.tokenizer)
    launcher = Launcher(deployment, log_level=server_config.log_level.upper())
    router = Router(launcher.discovery, deployment.router_config())
    try:
        await launcher.start()
        await router.start()
        await router.wait_ready()
        logger.info("serving %s on http://%s:%d with %d workers (%s)", router.model_name, server_config.host,
                    server_config.port, len(launcher.procs),
                    ", ".join(f"{w}={p.spec.role}" for w, p in launcher.procs.items()))
        app = build_app(router, tokenizer, router.model_name, server_config)
        app.state.launcher = launcher
        await serve_http(app, server_config)
    finally:
        await router.close()
        await launcher.stop()
