"""Simulated workers: the real engine core (scheduler, block pool, prefix cache, KV events, load
reports, request plane) around a runner that computes nothing and takes the time a step-time model
(`TimingModel` or a measured `Profile`) says, divided by a speed-up factor.

`SimRunner.execute` sleeps `timing.step_s(...) / speedup` and "samples" a token for every
request that reaches the end of its tokens (a fixed, deterministic id that is never an eos, so
requests run to their max_tokens). `SimCluster` starts N such workers on threads of this process,
each bound to its own ipc sockets and registered in a `LocalDiscovery`, so the real router and
frontend talk to them exactly as to worker processes.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time

from tidal.config import CacheConfig, EngineConfig, SchedulerConfig
from tidal.engine.engine import EngineCore
from tidal.engine.scheduler import SchedulerOutput
from tidal.protocol import WorkerInfo
from tidal.runtime.discovery import LocalDiscovery
from tidal.sim.timing import StepTimeModel, TimingModel
from tidal.worker.worker import StopFlag, WorkerSpec, serve_engine

logger = logging.getLogger(__name__)

SIM_MODEL_NAME = "sim"


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


class SimCluster:
    """N simulated workers (role `both`) on threads, registered in `discovery`."""

    def __init__(self, num_workers: int, timing: StepTimeModel = TimingModel(), speedup: float = 1.0,
                 num_blocks: int = 8192, block_size: int = 16, token_budget: int = 2048, max_num_seqs: int = 256,
                 max_model_len: int = 32768, vocab_size: int = 49152) -> None:
        self.num_workers = num_workers
        self.timing, self.speedup = timing, speedup
        self.config = EngineConfig(cache=CacheConfig(block_size=block_size, num_blocks=num_blocks),
                                   scheduler=SchedulerConfig(token_budget=token_budget, max_num_seqs=max_num_seqs))
        self.max_model_len, self.vocab_size = max_model_len, vocab_size
        self.discovery = LocalDiscovery()
        self.dir = tempfile.mkdtemp(prefix="tidal-sim-")
        self.threads: list[threading.Thread] = []
        self.stop = StopFlag()
        self.runners: list[SimRunner] = []

    async def start(self) -> None:
        for i in range(self.num_workers):
            worker_id = f"sim-{i}"
            spec = WorkerSpec(worker_id=worker_id, role="both", engine=self.config,
                              request_addr=f"ipc://{self.dir}/{worker_id}.req",
                              event_addr=f"ipc://{self.dir}/{worker_id}.ev")
            runner = SimRunner(self.config.cache.num_blocks, self.timing, self.speedup, self.vocab_size)
            self.runners.append(runner)

            def make_engine(spec=spec, runner=runner) -> EngineCore:
                return EngineCore.with_runner(self.config, runner, model_name=SIM_MODEL_NAME,
                                              vocab_size=self.vocab_size, max_model_len=self.max_model_len,
                                              worker_id=spec.worker_id, record_kv_events=True)
            thread = threading.Thread(target=serve_engine, args=(spec, make_engine, self.stop, os.getppid()),
                                      name=f"tidal-{worker_id}", daemon=True)
            thread.start()
            self.threads.append(thread)
            await self.discovery.register(WorkerInfo(worker_id=worker_id, role="both",
                                                     request_addr=spec.request_addr, event_addr=spec.event_addr,
                                                     pid=os.getpid(), device="sim"))

    async def stop_all(self) -> None:
        self.stop.requested = True
        for thread in self.threads:
            thread.join(timeout=10)
        for info in self.discovery.list():
            await self.discovery.unregister(info.worker_id, "stopped")
        shutil.rmtree(self.dir, ignore_errors=True)
