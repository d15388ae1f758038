"""The frontend side of the request plane for one worker process (an `EngineClient`).

Owns the worker process it spawns, two ZMQ sockets (requests out, outputs in), one asyncio
reader task that routes each `TokenDelta` to its request's queue, and one watchdog task.
Lifecycle: `start()` (spawn, wait for WorkerReady) -> `generate()` many times -> `shutdown()`.
If the worker dies, every open request ends with `EngineDeadError` and `is_healthy()` is False.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import tempfile
from collections.abc import AsyncIterator

import msgspec
import zmq
import zmq.asyncio

from tidal.config import EngineConfig
from tidal.frontend.engine_client import EngineDeadError
from tidal.protocol import (AbortRequest, AddRequest, EngineStats, Shutdown, StepOutputs, TokenDelta,
                            WorkerMessage, WorkerReady)
from tidal.worker.worker import run_worker

logger = logging.getLogger(__name__)

_DEAD = object()  # queue sentinel: the worker is gone


class WorkerClient:
    def __init__(self, config: EngineConfig, num_threads: int | None = None, log_level: str = "INFO"):
        self.config = config
        self.num_threads = num_threads or os.cpu_count()
        self.log_level = log_level
        self._dir = tempfile.mkdtemp(prefix="tidal-")
        self.request_addr = f"ipc://{self._dir}/requests"
        self.output_addr = f"ipc://{self._dir}/outputs"
        self._sync_ctx = zmq.Context()
        self._async_ctx = zmq.asyncio.Context()
        self._requests = self._sync_ctx.socket(zmq.PUSH)
        self._outputs = self._async_ctx.socket(zmq.PULL)
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(WorkerMessage)
        self._queues: dict[str, asyncio.Queue] = {}
        self._stats: EngineStats | None = None
        self._tasks: list[asyncio.Task] = []
        self._dead = False
        self.process: multiprocessing.process.BaseProcess | None = None
        self.ready: WorkerReady | None = None

    @property
    def max_model_len(self) -> int:
        return self.ready.max_model_len

    @property
    def model_name(self) -> str:
        return self.ready.model_name

    async def start(self, timeout_s: float = 600.0) -> None:
        self._requests.bind(self.request_addr)
        self._outputs.bind(self.output_addr)
        mp = multiprocessing.get_context("spawn")
        self.process = mp.Process(target=run_worker, name="tidal-worker", daemon=True,
                                  args=(self.config, self.request_addr, self.output_addr,
                                        self.num_threads, self.log_level))
        self.process.start()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.ready is None:
            if not self.process.is_alive():
                raise RuntimeError(f"worker exited with code {self.process.exitcode} while loading")
            if loop.time() > deadline:
                raise TimeoutError("worker did not become ready in time")
            if await self._outputs.poll(200):
                msg = self._decoder.decode(await self._outputs.recv())
                if isinstance(msg, WorkerReady):
                    self.ready = msg
        self._tasks = [asyncio.create_task(self._read_outputs()), asyncio.create_task(self._watch())]

    async def _read_outputs(self) -> None:
        while True:
            msg = self._decoder.decode(await self._outputs.recv())
            if not isinstance(msg, StepOutputs):
                continue
            if msg.stats is not None:
                self._stats = msg.stats
            for delta in msg.deltas:
                queue = self._queues.get(delta.request_id)
                if queue is not None:
                    queue.put_nowait(delta)

    async def _watch(self) -> None:
        while self.process.is_alive():
            await asyncio.sleep(0.2)
        self._dead = True
        logger.error("worker process died (exit code %s); failing %d open requests",
                     self.process.exitcode, len(self._queues))
        for queue in self._queues.values():
            queue.put_nowait(_DEAD)

    def _send(self, msg) -> None:
        self._requests.send(self._encoder.encode(msg), copy=False)

    async def generate(self, request: AddRequest) -> AsyncIterator[TokenDelta]:
        if self._dead:
            raise EngineDeadError("the engine worker is not running")
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request.request_id] = queue
        finished = False
        try:
            self._send(request)
            while not finished:
                delta = await queue.get()
                if delta is _DEAD:
                    raise EngineDeadError("the engine worker died while serving this request")
                finished = delta.finished
                yield delta
        finally:
            del self._queues[request.request_id]
            if not finished and not self._dead:
                self._send(AbortRequest(request_id=request.request_id))

    async def abort(self, request_id: str) -> None:
        if not self._dead:
            self._send(AbortRequest(request_id=request_id))

    def stats(self) -> EngineStats | None:
        return self._stats

    def is_healthy(self) -> bool:
        return not self._dead and self.process is not None and self.process.is_alive()

    async def shutdown(self, timeout_s: float = 10.0) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.process is not None and self.process.is_alive():
            self._send(Shutdown())
            await asyncio.to_thread(self.process.join, timeout_s)
            if self.process.is_alive():
                self.process.terminate()
                await asyncio.to_thread(self.process.join, 5)
        self._requests.close(linger=0)
        self._outputs.close(linger=0)
        self._sync_ctx.term()
        self._async_ctx.term()
        with contextlib.suppress(OSError):
            for name in os.listdir(self._dir):
                os.unlink(os.path.join(self._dir, name))
            os.rmdir(self._dir)
