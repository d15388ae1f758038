"""The launcher: starts every worker of a deployment on this machine, watches them, stops them.

Owns the worker processes and a scratch folder (in /dev/shm when there is one) that holds their
socket files and shared-memory KV caches. Each worker is registered in discovery as soon as it
is spawned (clients connect and wait for its `WorkerReady`); a worker that exits on its own is
reported, unregistered (so routing stops choosing it and its open requests move to other workers,
or fail with a clear error when none can take them) and its files are removed. `stop()` (the
whole deployment going down) sends SIGUSR1 to every worker: stop after the current step, no
grace period; waits, kills what is left, and removes the folder. `terminate_worker` sends one
worker SIGTERM: it leaves gracefully (see `tidal.worker.worker`).

The planner's local actuator changes the fleet while it runs: `add_worker(role, device)` spawns and
registers one more worker (named `ROLE-N`, N one past the highest used), `remove_worker` stops one
(the caller drains it first; SIGTERM, so anything left gets the worker's grace period) and
unregisters it, `set_role` records a flipped worker's new role
(its id keeps the old name: ids are names, roles are what discovery says).

`tidal.deploy.serve.serve_deployment` (`tidal serve`) puts a launcher together with the frontend(s)
and the planner.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
from dataclasses import dataclass

import msgspec

from tidal.deploy.assembly import worker_spec
from tidal.deploy.config import Deployment, WorkerSection
from tidal.protocol import Role, WorkerInfo
from tidal.runtime.discovery import Discovery, LocalDiscovery
from tidal.runtime.events import cancel_and_wait
from tidal.worker.worker import GPU_WORKER_THREADS, WorkerSpec, run_worker

logger = logging.getLogger(__name__)

SUPERVISE_INTERVAL_S = 0.2
STOP_TIMEOUT_S = 15.0


@dataclass
class _Proc:
    spec: WorkerSpec
    info: WorkerInfo
    process: multiprocessing.process.BaseProcess
    reported: bool = False  # its exit was handled (or expected: stopped on purpose)


class Launcher:
    def __init__(self, deployment: Deployment, discovery: Discovery | None = None, log_level: str = "INFO"):
        self.deployment = deployment
        self.discovery = discovery or LocalDiscovery()
        self.log_level = log_level
        self.procs: dict[str, _Proc] = {}
        self.dir: str | None = None
        self._supervisor: asyncio.Task | None = None
        self._stopping = False
        self._default_threads = 1

    async def start(self) -> None:
        shm = "/dev/shm"
        self.dir = tempfile.mkdtemp(prefix="tidal-", dir=shm if os.path.isdir(shm) else None)
        groups = self.deployment.worker_groups()
        num_cpu_ranks = sum(devices.count("cpu") for _, _, devices in groups) or 1
        self._default_threads = max(1, (os.cpu_count() or 1) // num_cpu_ranks)
        replica: dict[int, int] = {}  # id(section) -> replicas of it so far
        for worker_id, section, devices in groups:
            n = replica[id(section)] = replica.get(id(section), -1) + 1
            health_port = None if section.health_port is None else section.health_port + n
            await self._spawn(worker_id, section, devices, health_port)
        self._supervisor = asyncio.create_task(self._supervise())

    async def _spawn(self, worker_id: str, section: WorkerSection, devices: tuple[str, ...],
                     health_port: int | None = None) -> WorkerInfo:
        device, tp = devices[0], section.tensor_parallel_size
        spec = worker_spec(
            self.deployment, section, worker_id, devices, request_addr=f"ipc://{self.dir}/{worker_id}.req",
            event_addr=f"ipc://{self.dir}/{worker_id}.ev",
            transfer=self.deployment.transfer_config(self.dir) if tp == 1 else None,  # TP workers run aggregated
            num_threads=section.num_threads or (self._default_threads if device == "cpu" else GPU_WORKER_THREADS),
            log_level=self.log_level, stop_grace_s=section.stop_grace_s, health_port=health_port)
        # A daemonic process may not start processes, and a tensor-parallel worker starts its other ranks.
        process = multiprocessing.get_context("spawn").Process(target=run_worker, args=(spec,),
                                                               name=f"tidal-{worker_id}", daemon=tp == 1)
        process.start()
        info = WorkerInfo(worker_id=worker_id, role=section.role, request_addr=spec.request_addr,
                          event_addr=spec.event_addr, pid=process.pid, host=socket.gethostname(), device=device)
        self.procs[worker_id] = _Proc(spec, info, process)
        await self.discovery.register(info)
        logger.info("started worker %s (role=%s, device=%s, pid=%d)", worker_id, section.role, ",".join(devices),
                    process.pid)
        return info

    # ---- the planner's local actuator --------------------------------------------------------
    def _role_section(self, role: Role):
        """The settings a worker of `role` gets: the first worker section of that role in the config,
        else the first section, with that role."""
        template = next((w for w in self.deployment.workers if w.role == role), self.deployment.workers[0])
        return template.model_copy(update={"role": role, "count": 1, "devices": None, "tensor_parallel_size": 1})

    def role_limits(self, role: Role):
        """The scheduler limits (token_budget, max_num_seqs) a worker of `role` runs with, profile
        tuning included: what a flipped worker takes on."""
        return self.deployment.engine_config(self._role_section(role), "cpu").scheduler

    async def add_worker(self, role: Role, device: str = "cpu") -> str:
        """Start one more worker of `role` on `device` (engine settings: `_role_section`; no health
        endpoint); returns its id once it is registered."""
        section = self._role_section(role)
        taken = [int(w.rsplit("-", 1)[1]) for w in self.procs if w.rsplit("-", 1)[0] == role]
        worker_id = f"{role}-{max(taken, default=-1) + 1}"
        await self._spawn(worker_id, section, (device,))
        return worker_id

    async def remove_worker(self, worker_id: str) -> None:
        """Stop one (drained) worker: SIGTERM, wait, kill if it lingers; unregister it; remove its files."""
        proc = self.procs[worker_id]
        proc.reported = True  # an exit on purpose: supervision stays quiet
        if proc.process.is_alive():
            proc.process.terminate()
        timeout_s = proc.spec.stop_grace_s + STOP_TIMEOUT_S
        await asyncio.to_thread(proc.process.join, timeout_s)
        if proc.process.is_alive():
            logger.warning("worker %s did not stop in %.0fs; killing it", worker_id, timeout_s)
            proc.process.kill()
            await asyncio.to_thread(proc.process.join, 5)
        await self.discovery.unregister(worker_id, "removed by the planner")
        self._remove_files(worker_id)
        del self.procs[worker_id]
        logger.info("stopped worker %s (role=%s)", worker_id, proc.info.role)

    async def set_role(self, worker_id: str, role: Role) -> None:
        """Record a flipped worker's new role (the worker and the router already switched)."""
        proc = self.procs[worker_id]
        proc.info = msgspec.structs.replace(proc.info, role=role)
        proc.spec = dataclasses.replace(proc.spec, role=role)
        await self.discovery.update(proc.info)

    def devices_in_use(self) -> set[str]:
        return {proc.info.device for proc in self.procs.values()}

    async def _supervise(self) -> None:
        while True:
            await asyncio.sleep(SUPERVISE_INTERVAL_S)
            for worker_id, proc in list(self.procs.items()):
                if proc.reported or proc.process.is_alive():
                    continue
                proc.reported = True
                reason = f"exited with code {proc.process.exitcode}"
                if proc.process.exitcode == 0:
                    logger.info("worker %s (role=%s) left", worker_id, proc.spec.role)
                else:
                    logger.error("worker %s (role=%s) %s; it gets no new requests and its open ones move",
                                 worker_id, proc.spec.role, reason)
                await self.discovery.unregister(worker_id, reason)
                self._remove_files(worker_id)

    def kill_worker(self, worker_id: str) -> None:
        """SIGKILL one worker (fault tests); supervision reports it like any other death."""
        self.procs[worker_id].process.kill()

    def terminate_worker(self, worker_id: str) -> None:
        """SIGTERM one worker: it leaves gracefully (drained at once, exits within its grace period);
        supervision then unregisters it."""
        self.procs[worker_id].process.terminate()

    async def stop(self) -> None:
        self._stopping = True
        await cancel_and_wait(self._supervisor)
        for proc in self.procs.values():
            if proc.process.is_alive() and proc.process.pid is not None:
                # SIGUSR1: the worker finishes its step and closes (SIGTERM would give it a grace period;
                # the frontend has already finished or cancelled what it could).
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.process.pid, signal.SIGUSR1)
        await asyncio.gather(*(asyncio.to_thread(p.process.join, STOP_TIMEOUT_S) for p in self.procs.values()))
        for worker_id, proc in list(self.procs.items()):
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
