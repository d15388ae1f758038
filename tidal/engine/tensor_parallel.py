"""A worker as a tensor-parallel group: rank 0 (the leader) runs the engine, ranks 1.. follow it.

`TensorParallelGroup` is the leader's side. It owns the follower processes, the store they meet
at, and a thread that watches them. Lifecycle:
1. `TensorParallelGroup(config)`, in `factory.build_engine` before the leader loads its shard:
   checks the model can be split, starts a TCP store on a free port and spawns ranks 1..tp-1
   (multiprocessing, spawn context; rank r on `devices[r]`). Every rank loads its own shard at
   the same time; a follower then marks itself ready in the store and joins the group.
2. `connect()`, once the leader holds its shard: waits for every follower to be ready (raising at
   once if one exited), then joins the group as rank 0. Every rank then builds a `ModelRunner`
   from the same config, so they capture the same CUDA graphs (warm-up and capture run the same
   collectives everywhere).
3. Every step: `broadcast(packed)` (the leader runner's `on_step`) sends the packed `StepBatch`;
   each follower unpacks it and runs `runner.forward` (its logits are dropped: rank 0 samples).
4. `close()`: sends the stop message, joins the followers (SIGTERM, then SIGKILL, for any that
   have not exited in time) and leaves the group. Idempotent; `EngineCore.close` calls it.

No follower outlives the leader: followers ignore SIGINT (Ctrl-C reaches the leader, which
stops them in order), are daemonic (a leader that exits normally terminates them), and a
watchdog thread in each exits it when its parent pid changes (the leader was killed). A
follower logs its own errors on the stderr it shares with the leader; the leader's watcher
logs the follower's exit, and the leader's next step raises.

Not yet: KV transfer (disaggregation) from a TP group would need a transfer per rank, so a TP
engine has no transfer backend and runs aggregated.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time

import numpy as np
import torch
import torch.distributed as dist

from tidal.config import EngineConfig, rank_devices
from tidal.logs import configure_logging, current_log_format
from tidal.parallel.group import broadcast_step, destroy_tensor_parallel, init_tensor_parallel, receive_step
from tidal.parallel.group import tp_size as tp_size_now
from tidal.engine.batch import StepBatch
from tidal.engine.model_runner import ModelRunner, kv_layout
from tidal.models.arch import check_tensor_parallel
from tidal.models.loader import load_model, read_arch

logger = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 1800.0
"""Loading a shard of a large model from a slow disk takes minutes; a rank that has not joined
after this long is taken for hung."""
STOP_TIMEOUT_S = 10.0
ORPHAN_CHECK_S = 0.5


def group_devices(config: EngineConfig) -> tuple[str, ...]:
    p = config.parallel
    return p.devices or rank_devices(config.model.device, p.tensor_parallel_size)


def check_group_config(config: EngineConfig, with_kv_transfer: bool) -> None:
    """Raise a clear error for a config a TP group can't run (before any process starts)."""
    tp_size = config.parallel.tensor_parallel_size
    if with_kv_transfer:
        raise ValueError(f"tensor_parallel_size={tp_size}: tensor-parallel workers run aggregated for now "
                         f"(no KV transfer, so no prefill or decode role)")
    if tp_size_now() > 1:
        raise RuntimeError("this process already leads a tensor-parallel group (one per process): close its engine "
                           "first")
    devices = group_devices(config)
    if any(d != "cpu" and not d.startswith("cuda") for d in devices) or len({d == "cpu" for d in devices}) > 1:
        raise ValueError(f"tensor-parallel devices {devices} must be all cpu or all cuda")
    check_tensor_parallel(read_arch(config.model), tp_size)


class TensorParallelGroup:
    def __init__(self, config: EngineConfig, with_kv_transfer: bool = False):
        check_group_config(config, with_kv_transfer)
        self.size = config.parallel.tensor_parallel_size
        self.devices = group_devices(config)
        self.backend = "nccl" if self.devices[0].startswith("cuda") else "gloo"
        if self.backend == "nccl":
            torch.cuda.set_device(torch.device(self.devices[0]))  # the leader's model loads on "cuda" too
        self.failure: str | None = None
        self._connected = False
        self._closing = False
        self.processes: list[multiprocessing.process.BaseProcess] = []
        self.store = dist.TCPStore("127.0.0.1", 0, self.size, is_master=True, wait_for_workers=False,
                                   timeout=datetime.timedelta(seconds=JOIN_TIMEOUT_S))
        try:
            self._spawn(config)
        except BaseException:
            self.close()
            raise
        self._watcher = threading.Thread(target=self._watch, name="tidal-tp-watch", daemon=True)
        self._watcher.start()

    def _spawn(self, config: EngineConfig) -> None:
        ctx = multiprocessing.get_context("spawn")
        log_level, log_format = logging.getLogger().getEffectiveLevel(), current_log_format()
        for rank in range(1, self.size):
            process = ctx.Process(target=run_follower, name=f"tidal-tp-rank-{rank}", daemon=True,
                                  args=(config, rank, self.store.port, os.getpid(), torch.get_num_threads(),
                                        log_level, log_format))
            process.start()
            self.processes.append(process)
        logger.info("tensor parallel: %d ranks on %s (followers: pids %s)", self.size, ", ".join(self.devices),
                    ", ".join(str(p.pid) for p in self.processes))

    def connect(self) -> None:
        """Wait until every follower holds its shard, then join the group as rank 0."""
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        for rank, process in enumerate(self.processes, start=1):
            while not self.store.check([f"ready/{rank}"]):
                if not process.is_alive():
                    raise RuntimeError(f"tensor-parallel rank {rank} exited with code {process.exitcode} "
                                       f"before joining; see its log above")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"tensor-parallel rank {rank} did not load its shard in {JOIN_TIMEOUT_S:.0f}s")
                time.sleep(0.02)
        init_tensor_parallel(0, self.size, backend=self.backend, store=self.store, device=self.devices[0])
        self._connected = True

    def broadcast(self, packed: np.ndarray) -> None:
        """Send one packed step (`StepBatch.pack()`) to the followers (the leader runner's `on_step`)."""
        if self.failure is None:
            try:
                broadcast_step(packed)
                return
            except RuntimeError:
                self._watcher.join(1)  # a follower that died shows here first: let the watcher name it
                if self.failure is None:
                    raise
        raise RuntimeError(self.failure)

    def _watch(self) -> None:
        ended = multiprocessing.connection.wait([p.sentinel for p in self.processes])
        if self._closing:
            return
        dead = []
        for rank, process in enumerate(self.processes, start=1):
            if process.sentinel in ended:
                process.join(1)  # the sentinel may fire just before the exit code is there
                dead.append(f"rank {rank} (pid {process.pid}) exited with code {process.exitcode}")
        self.failure = f"tensor-parallel group broken: {', '.join(dead)} (its log, if any, is above)"
        logger.error(self.failure)

    def close(self) -> None:
        """Stop the followers and leave the group (once; later calls do nothing)."""
        if self._closing:
            return
        self._closing = True
        if self._connected and self.failure is None:
            try:
                broadcast_step(None)
            except Exception as exc:  # a follower died since: it is joined below
                logger.warning("could not send the stop message to the tensor-parallel followers: %s", exc)
        for rank, process in enumerate(self.processes, start=1):
            process.join(STOP_TIMEOUT_S if self._connected else 0)
            if process.is_alive():
                if self._connected:
                    logger.warning("tensor-parallel rank %d did not stop in %.0fs; terminating it", rank,
                                   STOP_TIMEOUT_S)
                process.terminate()
                process.join(5)
            if process.is_alive():
                process.kill()
                process.join()
        if self._connected:
            self._leave_group()
        self.store = None

    def _leave_group(self) -> None:
        """Destroy the process group; under NCCL in a side thread, bounded, since its teardown can
        wait on peers that are gone (a later group in this process then can't start: logged)."""
        if self.backend != "nccl":
            destroy_tensor_parallel()
            return
        done = threading.Thread(target=destroy_tensor_parallel, name="tidal-tp-destroy", daemon=True)
        done.start()
        done.join(STOP_TIMEOUT_S)
        if done.is_alive():
            logger.warning("the NCCL process group did not shut down in %.0fs; leaving it", STOP_TIMEOUT_S)


# ---- the follower process ------------------------------------------------------------------

def run_follower(config: EngineConfig, rank: int, store_port: int, leader_pid: int, num_threads: int,
                 log_level: int, log_format: str = "text") -> None:
    """Entry point of rank `rank` (multiprocessing target): load, join, follow, exit."""
    configure_logging(log_level, log_format, f"tp rank {rank}")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_when_orphaned, args=(leader_pid,), name="tidal-tp-orphan", daemon=True).start()
    torch.set_num_threads(num_threads)
    try:
        runner = _start_follower(config, rank, store_port)
        _follow(runner)
    except Exception:
        logger.exception("tensor-parallel rank %d failed", rank)
        raise SystemExit(1) from None
    finally:
        destroy_tensor_parallel()


def _start_follower(config: EngineConfig, rank: int, store_port: int) -> ModelRunner:
    tp_size = config.parallel.tensor_parallel_size
    device = group_devices(config)[rank]
    config = config.replace(model=dataclasses.replace(config.model, device=device))
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    store = dist.TCPStore("127.0.0.1", store_port, tp_size, is_master=False,
                          timeout=datetime.timedelta(seconds=JOIN_TIMEOUT_S))
    loaded = load_model(config.model, tp_rank=rank, tp_size=tp_size)
    store.set(f"ready/{rank}", "1")
    init_tensor_parallel(rank, tp_size, backend="nccl" if device.startswith("cuda") else "gloo", store=store,
                         device=device)
    return ModelRunner(config, loaded, kv_layout(config, loaded))


@torch.inference_mode()
def _follow(runner: ModelRunner) -> None:
    """Run every step the leader sends, until it sends stop."""
    while (packed := receive_step()) is not None:
        runner.forward(StepBatch.unpack(packed), packed)
    if runner.device.type == "cuda":
        # NCCL's teardown waits on its peers and can hang a stopping group (seen on 2x H200): after
        # the last step has finished there is nothing to hand back, so leave without it.
        torch.cuda.synchronize(runner.device)
        logging.shutdown()
        os._exit(0)


def _exit_when_orphaned(leader_pid: int) -> None:
    while True:
        time.sleep(ORPHAN_CHECK_S)
        if os.getppid() != leader_pid:
            logger.error("the leader (pid %d) is gone; exiting", leader_pid)
            os._exit(1)
