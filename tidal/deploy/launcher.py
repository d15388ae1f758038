"""The launcher: starts every worker of a deployment on this machine, watches them, stops them.

Owns the worker processes and a scratch folder (in /dev/shm when there is one) that holds their
socket files and shared-memory KV caches. Each worker is registered in discovery as soon as it
is spawned (clients connect and wait for its `WorkerReady`). A worker that exits on its own is
reported, unregistered (so routing stops choosing it and its open requests move to other workers,
or fail with a clear error when none can take them) and its files are removed; then, when its exit
was unexpected (a nonzero code or a signal, not a stop the launcher asked for), it is started again
with the same id, role, devices and health port after the `RestartPolicy` backoff
(`tidal.deploy.supervisor`), counted on `tidal_worker_restarts_total{worker,role}`; past the
policy's limit it stays down, and the log says so. A worker that exits with code 0 left on purpose
(SIGTERM) and is not restarted.

`stop()` (the whole deployment going down) sends SIGUSR1 to every worker: stop after the current
step, no grace period; waits, kills what is left, and removes the folder. `terminate_worker` sends
one worker SIGTERM: it leaves gracefully (see `tidal.worker.worker`) and is not restarted.

The planner's local actuator changes the fleet while it runs: `add_worker(role, device)` spawns and
registers one more worker (named `ROLE-N`, N one past the highest used), `remove_worker` stops one
(the caller drains it first; SIGTERM, so anything left gets the worker's grace period) and
unregisters it (a restart pending for it is dropped), `set_role` records a flipped worker's new role
(its id keeps the old name: ids are names, roles are what discovery says; a restart keeps the new role).

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
import time
from dataclasses import dataclass

import msgspec

from tidal.deploy.assembly import worker_spec
from tidal.deploy.config import Deployment, WorkerSection
from tidal.deploy.supervisor import RestartPolicy, exit_reason, worker_restart_counter
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
    asked_to_stop: bool = False  # the launcher sent it SIGTERM: its exit is no crash
    restart_at: float | None = None  # when a dead worker starts again (time.monotonic())


class Launcher:
    def __init__(self, deployment: Deployment, discovery: Discovery | None = None, log_level: str = "INFO",
                 registry=None, log_format: str = "text"):
        """`registry`: where `tidal_worker_restarts_total` goes (the router's, so /metrics shows it;
        None in multiprocess mode, where the metric files carry it)."""
        self.deployment = deployment
        self.discovery = discovery or LocalDiscovery()
        self.log_level = log_level
        self.log_format = log_format
        self.procs: dict[str, _Proc] = {}
        self.restart_policy = RestartPolicy(deployment.restarts.build())
        self.restarts = worker_restart_counter(registry)
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
            log_level=self.log_level, log_format=self.log_format, stop_grace_s=section.stop_grace_s,
            health_port=health_port)
        # A worker's health endpoint binds where the API does: loopback unless the API is exposed.
        spec = dataclasses.replace(spec, health_host=self.deployment.frontend.host)
        proc = self.procs[worker_id] = await self._start_process(spec, device)
        self.restarts.labels(worker=worker_id, role=section.role)  # its series exists, at 0, before any restart
        logger.info("started worker %s (role=%s, device=%s, pid=%d)", worker_id, section.role, ",".join(devices),
                    proc.process.pid)
        return proc.info

    async def _start_process(self, spec: WorkerSpec, device: str) -> _Proc:
        """Start the process of `spec` and register it in discovery."""
        tp = spec.engine.parallel.tensor_parallel_size
        # A daemonic process may not start processes, and a tensor-parallel worker starts its other ranks.
        process = multiprocessing.get_context("spawn").Process(target=run_worker, args=(spec,),
                                                               name=f"tidal-{spec.worker_id}", daemon=tp == 1)
        process.start()
        info = WorkerInfo(worker_id=spec.worker_id, role=spec.role, request_addr=spec.request_addr,
                          event_addr=spec.event_addr, pid=process.pid, host=socket.gethostname(), device=device)
        await self.discovery.register(info)
        return _Proc(spec, info, process)

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
        proc.restart_at = None
        self.restart_policy.forget(worker_id)
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
            now = time.monotonic()
            for worker_id, proc in list(self.procs.items()):
                if proc.restart_at is not None and now >= proc.restart_at:
                    await self._restart(worker_id, proc)
                elif not (proc.reported or proc.process.is_alive()):
                    await self._on_exit(worker_id, proc, now)

    async def _on_exit(self, worker_id: str, proc: _Proc, now: float) -> None:
        """A worker exited on its own: out of discovery (its open requests move), its files removed;
        restarted later when the exit was unexpected and the policy allows."""
        proc.reported = True
        exitcode = proc.process.exitcode
        reason = exit_reason(exitcode)
        await self.discovery.unregister(worker_id, reason)
        self._remove_files(worker_id)
        role = proc.spec.role
        if exitcode == 0 or proc.asked_to_stop:
            logger.info("worker %s (role=%s) left (%s)", worker_id, role, reason)
            return
        delay_s = self.restart_policy.on_exit(worker_id, now)
        if delay_s is None:
            c = self.restart_policy.config
            logger.error("worker %s (role=%s, pid %d) %s; it stays down: it was restarted %d times in the "
                         "last %.0fs (restarts.max_restarts)", worker_id, role, proc.process.pid, reason,
                         c.max_restarts, c.window_s)
            return
        proc.restart_at = now + delay_s
        logger.error("worker %s (role=%s, pid %d) %s; its open requests move; restarting it in %.1fs",
                     worker_id, role, proc.process.pid, reason, delay_s)

    async def _restart(self, worker_id: str, proc: _Proc) -> None:
        """Start a dead worker again: the same spec (id, role, devices, addresses, health port)."""
        proc.restart_at = None
        new = self.procs[worker_id] = await self._start_process(proc.spec, proc.info.device)
        self.restarts.labels(worker=worker_id, role=proc.spec.role).inc()
        logger.warning("restarted worker %s (role=%s, pid %d; restart %d in the last %.0fs)", worker_id,
                       proc.spec.role, new.process.pid, self.restart_policy.restarts(worker_id, time.monotonic()),
                       self.restart_policy.config.window_s)

    def kill_worker(self, worker_id: str) -> None:
        """SIGKILL one worker (fault tests); supervision handles it like any other death (a restart)."""
        self.procs[worker_id].process.kill()

    def terminate_worker(self, worker_id: str) -> None:
        """SIGTERM one worker: it leaves gracefully (drained at once, exits within its grace period);
        supervision then unregisters it and does not restart it."""
        proc = self.procs[worker_id]
        proc.asked_to_stop = True
        proc.process.terminate()

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
