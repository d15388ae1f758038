"""Simulated workers: the real engine core (scheduler, block pool, prefix cache, KV events, load
reports, request plane) around a runner that computes nothing and takes the time a step-time model
(`TimingModel` or a measured `Profile`) says, divided by a speed-up factor.

`SimRunner.execute` sleeps `timing.step_s(...) / speedup` and "samples" a token for every
request that reaches the end of its tokens (a fixed, deterministic id that is never an eos, so
requests run to their max_tokens). `SimCluster` starts N such workers, each bound to its own ipc
sockets under a temporary folder and registered in a `LocalDiscovery`, so the real router and
frontend talk to them exactly as to worker processes.

Where the workers run (`worker_processes`):
- 0: on threads of this (the serving) process. Cheap to start, but their CPU counts as the
  frontend's and they share its GIL.
- P > 0: in P spawned processes, the workers dealt round-robin over them, each process running its
  share on threads. One process per worker gives each its own GIL; fewer processes than workers
  keep a small box from spawning one torch-importing interpreter per worker (about 2 s of CPU and
  ~300 MB each) when simulated workers mostly sleep anyway.

Lifecycle: `start()` spawns (or starts threads) and registers every worker with its addresses
(the router connects and waits for `WorkerReady`, so registering before a worker has bound is
fine); `stop_all()` stops every worker after its current step (SIGUSR1 to the processes; Ctrl-C
is ignored there, the parent stops them), kills a process that hasn't exited in 10 s, unregisters
the workers and removes the socket folder. A worker process also exits when its parent vanishes
(the worker loop's parent check), so a killed `tidal sim` leaves no simulated workers behind.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass

from tidal.config import SIMULATED_WORKER, CacheConfig, EngineConfig, SchedulerConfig
from tidal.engine.engine import EngineCore, ServedModel
from tidal.engine.scheduler import SchedulerOutput
from tidal.logs import configure_logging
from tidal.protocol import WorkerInfo
from tidal.runtime.discovery import LocalDiscovery
from tidal.sim.timing import StepTimeModel, TimingModel
from tidal.worker.worker import StopFlag, WorkerSpec, serve_engine

logger = logging.getLogger(__name__)

SIM_MODEL_NAME = "sim"
SIM_PROCESS_NAME = "tidal-sim-wkr"  # /proc/PID/comm of a worker process: benchmarks tell it from API servers
STOP_TIMEOUT_S = 10.0


class SimRunner:
    def __init__(self, num_blocks: int, timing: StepTimeModel, speedup: float, vocab_size: int) -> None:
        self.num_blocks = num_blocks
        self.timing = timing
        self.speedup = speedup
        self.vocab_size = vocab_size
        self.simulated_s = 0.0  # model time the steps took, before the speed-up

    def execute(self, out: SchedulerOutput, eos_token_ids: frozenset[int]):
        prefill_tokens = decode_seqs = context = 0
        for item in out.scheduled:
            if item.num_new_tokens == 1:
                decode_seqs += 1
                context += item.request.num_computed_tokens + 1
            else:
                prefill_tokens += item.num_new_tokens
        step_s = self.timing.step_s(prefill_tokens, decode_seqs, context)
        self.simulated_s += step_s
        time.sleep(step_s / self.speedup)
        sampled = {}
        for item in out.scheduled:
            if item.samples:
                token = (item.request.num_tokens * 7919) % self.vocab_size
                while token in eos_token_ids:
                    token = (token + 1) % self.vocab_size
                sampled[item.request.request_id] = token
        return sampled, {}


@dataclass(frozen=True)
class SimWorkerSetup:
    """What every simulated worker shares; picklable, so a worker process gets it at spawn."""

    config: EngineConfig
    timing: StepTimeModel
    speedup: float
    vocab_size: int
    max_model_len: int


def start_sim_worker(spec: WorkerSpec, setup: SimWorkerSetup, stop: StopFlag, parent_pid: int) -> threading.Thread:
    """One simulated worker on a new thread of this process; it ends when `stop.requested`."""
    runner = SimRunner(setup.config.cache.num_blocks, setup.timing, setup.speedup, setup.vocab_size)

    def make_engine() -> EngineCore:
        model = ServedModel(SIM_MODEL_NAME, vocab_size=setup.vocab_size, max_model_len=setup.max_model_len)
        return EngineCore(setup.config, runner, model, worker_id=spec.worker_id, record_kv_events=True)
    thread = threading.Thread(target=serve_engine, args=(spec, make_engine, stop, parent_pid),
                              name=f"tidal-{spec.worker_id}", daemon=True)
    thread.start()
    return thread


def host_sim_workers(specs: list[WorkerSpec], setup: SimWorkerSetup, log_level: int) -> None:
    """Entry point of a worker process (spawned): its share of the workers on threads, until
    SIGUSR1/SIGTERM or the parent's exit (each worker loop checks for that)."""
    configure_logging(log_level, specs[0].log_format if specs else "text", "sim-workers")
    _name_process(SIM_PROCESS_NAME)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches `tidal sim`, which stops us
    stop = StopFlag()
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda *_: setattr(stop, "requested", True))
    parent = os.getppid()
    threads = [start_sim_worker(spec, setup, stop, parent) for spec in specs]
    for thread in threads:
        while thread.is_alive():
            thread.join(timeout=0.5)  # a bounded wait lets the signal handlers run


def _name_process(name: str) -> None:
    """Set this process's name as ps and /proc/PID/comm show it (Linux; elsewhere nothing)."""
    try:
        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # 15: PR_SET_NAME
    except (OSError, AttributeError):
        pass


class SimCluster:
    """N simulated workers (role `both`) on threads or in `worker_processes` processes (see the
    module docstring), registered in `discovery`."""

    def __init__(self, num_workers: int, timing: StepTimeModel = TimingModel(), speedup: float = 1.0,
                 num_blocks: int = SIMULATED_WORKER.cache.num_blocks, block_size: int = CacheConfig.block_size,
                 token_budget: int = SIMULATED_WORKER.scheduler.token_budget,
                 max_num_seqs: int = SIMULATED_WORKER.scheduler.max_num_seqs,
                 max_model_len: int = 32768, vocab_size: int = 49152, worker_processes: int = 0) -> None:
        self.num_workers = num_workers
        self.timing, self.speedup = timing, speedup
        self.config = EngineConfig(cache=CacheConfig(block_size=block_size, num_blocks=num_blocks),
                                   scheduler=SchedulerConfig(token_budget=token_budget, max_num_seqs=max_num_seqs))
        self.setup = SimWorkerSetup(self.config, timing, speedup, vocab_size, max_model_len)
        self.max_model_len, self.vocab_size = max_model_len, vocab_size
        self.worker_processes = min(worker_processes, num_workers)
        self.discovery = LocalDiscovery()
        self.dir = tempfile.mkdtemp(prefix="tidal-sim-")
        self.threads: list[threading.Thread] = []
        self.processes: list[multiprocessing.process.BaseProcess] = []
        self.stop = StopFlag()

    def _spec(self, i: int) -> WorkerSpec:
        worker_id = f"sim-{i}"
        return WorkerSpec(worker_id=worker_id, role="both", engine=self.config,
                          request_addr=f"ipc://{self.dir}/{worker_id}.req",
                          event_addr=f"ipc://{self.dir}/{worker_id}.ev")

    async def start(self) -> None:
        specs = [self._spec(i) for i in range(self.num_workers)]
        pids = {}
        if self.worker_processes:
            ctx = multiprocessing.get_context("spawn")
            for p in range(self.worker_processes):
                share = specs[p::self.worker_processes]
                process = ctx.Process(target=host_sim_workers, name=f"tidal-sim-workers-{p}", daemon=True,
                                      args=(share, self.setup, logging.getLogger().getEffectiveLevel()))
                process.start()
                self.processes.append(process)
                pids.update({spec.worker_id: process.pid for spec in share})
        else:
            for spec in specs:
                self.threads.append(start_sim_worker(spec, self.setup, self.stop, os.getppid()))
        for spec in specs:
            await self.discovery.register(WorkerInfo(worker_id=spec.worker_id, role="both",
                                                     request_addr=spec.request_addr, event_addr=spec.event_addr,
                                                     pid=pids.get(spec.worker_id, os.getpid()), device="sim"))

    async def stop_all(self) -> None:
        self.stop.requested = True
        for thread in self.threads:
            await asyncio.to_thread(thread.join, STOP_TIMEOUT_S)
        for process in self.processes:
            if process.is_alive():
                try:
                    os.kill(process.pid, signal.SIGUSR1)
                except ProcessLookupError:
                    pass  # it exited since we asked
        for process in self.processes:
            await asyncio.to_thread(process.join, STOP_TIMEOUT_S)
            if process.exitcode is None:
                logger.warning("simulated worker process %d did not stop in %.0f s; killing it", process.pid,
                               STOP_TIMEOUT_S)
                process.kill()
                process.join()
            process.close()
        self.processes.clear()
        for info in self.discovery.list():
            await self.discovery.unregister(info.worker_id, "stopped")
        shutil.rmtree(self.dir, ignore_errors=True)
