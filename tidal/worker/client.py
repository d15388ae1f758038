"""The frontend side of the request plane for one worker (an `EngineClient`).

Owns one ZMQ DEALER socket connected to the worker's ROUTER and one asyncio reader task that
routes each `TokenDelta` to its request's queue. It does not own the worker process: whoever
started the worker (the launcher) watches it and calls `mark_dead` when it exits.
Lifecycle: `start()` (Connect, wait for WorkerReady) -> `generate()` many times -> `close()`.
Once dead, every open request ends with `EngineDeadError` and `is_healthy()` is False.
`set_role()` flips an idle worker's role (the planner's actuator drains it first); `role` follows.
A worker that got SIGTERM says `WorkerLeaving` (`leaving` turns True, `on_leaving` is called: the
router routes nothing new to it) and, when it exits, `WorkerGone`, which marks it dead at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable

import msgspec
import zmq
import zmq.asyncio

from tidal.frontend.engine_client import EngineDeadError
from tidal.protocol import (AbortRequest, AddRequest, Connect, EngineStats, KVDump, KVDumpRequest, ReleaseKV,
                            RoleRefused, SetRole, Shutdown, StepOutputs, TokenDelta, WorkerGone, WorkerInfo,
                            WorkerLeaving, WorkerMessage, WorkerReady)

logger = logging.getLogger(__name__)


class _Dead:
    """Queue sentinel: the worker is gone."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


class RoleChangeError(RuntimeError):
    """A worker refused (or did not answer) a `SetRole`; its role is unchanged."""


class WorkerClient:
    def __init__(self, info: WorkerInfo, ctx: zmq.asyncio.Context | None = None):
        self.info = info
        self._own_ctx = ctx is None
        self._ctx = ctx or zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.IDENTITY, f"{info.worker_id}:{uuid.uuid4().hex[:12]}".encode())
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(WorkerMessage)
        self._queues: dict[str, asyncio.Queue] = {}
        self._stats: EngineStats | None = None
        self._role_reply: asyncio.Future | None = None
        self._reader: asyncio.Task | None = None
        self.dead_reason: str | None = None
        self.leaving = False  # the worker said it is leaving (SIGTERM): send it nothing new
        self.ready: WorkerReady | None = None
        self.on_dump: Callable[[KVDump], None] | None = None  # answers to `request_dump`
        self.on_leaving: Callable[[WorkerLeaving], None] | None = None

    @property
    def worker_id(self) -> str:
        return self.info.worker_id

    @property
    def role(self) -> str:
        return self.info.role

    @property
    def max_model_len(self) -> int:
        return self.ready.max_model_len

    @property
    def model_name(self) -> str:
        return self.ready.model_name

    @property
    def num_open_requests(self) -> int:
        return len(self._queues)

    async def start(self, timeout_s: float = 600.0) -> None:
        """Connect and wait until the worker's engine is loaded (it answers `Connect` then)."""
        self._sock.connect(self.info.request_addr)
        self._send(Connect(client_id=self._sock.getsockopt(zmq.IDENTITY).decode()))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.ready is None:
            if self.dead_reason is not None:
                raise EngineDeadError(f"worker {self.worker_id} died while loading: {self.dead_reason}")
            if loop.time() > deadline:
                raise TimeoutError(f"worker {self.worker_id} did not become ready in {timeout_s:.0f}s")
            if await self._sock.poll(200):
                msg = self._decoder.decode(await self._sock.recv())
                if isinstance(msg, WorkerReady):
                    self.ready = msg
        self._reader = asyncio.create_task(self._read_outputs())

    async def _read_outputs(self) -> None:
        while True:
            msg = self._decoder.decode(await self._sock.recv())
            if isinstance(msg, KVDump):
                if self.on_dump is not None:
                    self.on_dump(msg)
                continue
            if isinstance(msg, WorkerLeaving):
                logger.info("worker %s is leaving (grace %.0fs)", self.worker_id, msg.grace_s)
                self.leaving = True
                if self.on_leaving is not None:
                    self.on_leaving(msg)
                continue
            if isinstance(msg, WorkerGone):
                self.leaving = True
                self.mark_dead(f"the worker left: {msg.reason}")
                continue
            if isinstance(msg, (WorkerReady, RoleRefused)):
                if self._role_reply is not None and not self._role_reply.done():
                    self._role_reply.set_result(msg)
                continue
            if not isinstance(msg, StepOutputs):
                continue
            if msg.stats is not None:
                self.update_stats(msg.stats)
            for delta in msg.deltas:
                queue = self._queues.get(delta.request_id)
                if queue is not None:
                    queue.put_nowait(delta)

    def mark_dead(self, reason: str) -> None:
        """The worker is gone: end every open request with EngineDeadError (a router may move
        them), refuse new ones."""
        if self.dead_reason is not None:
            return
        self.dead_reason = reason
        if self._queues:
            logger.warning("worker %s is gone (%s) with %d open requests", self.worker_id, reason,
                           len(self._queues))
        for queue in self._queues.values():
            queue.put_nowait(_Dead(reason))

    def _send(self, msg) -> None:
        self._sock.send(self._encoder.encode(msg), copy=False)

    async def generate(self, request: AddRequest) -> AsyncIterator[TokenDelta]:
        if self.dead_reason is not None:
            raise EngineDeadError(f"worker {self.worker_id} is not running")
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request.request_id] = queue
        finished = False
        try:
            self._send(request)
            while not finished:
                delta = await queue.get()
                if isinstance(delta, _Dead):
                    raise EngineDeadError(f"worker {self.worker_id} died while serving this request "
                                          f"({delta.reason})")
                finished = delta.finished
                yield delta
        finally:
            del self._queues[request.request_id]
            if not finished and self.dead_reason is None:
                self._send(AbortRequest(request_id=request.request_id))

    async def abort(self, request_id: str) -> None:
        if self.dead_reason is None:
            self._send(AbortRequest(request_id=request_id))

    def release_kv(self, request_id: str) -> None:
        """Free a remote prefill's held blocks (its KV will not be pulled)."""
        if self.dead_reason is None:
            self._send(ReleaseKV(request_id=request_id))

    def request_dump(self) -> None:
        """Ask for the worker's whole prefix cache; the `KVDump` goes to `on_dump`."""
        if self.dead_reason is None:
            self._send(KVDumpRequest())

    async def set_role(self, role: str, timeout_s: float = 10.0, token_budget: int | None = None,
                       max_num_seqs: int | None = None) -> None:
        """Ask the (idle) worker to take `role`; raises RoleChangeError if it refuses or is silent."""
        if self.dead_reason is not None:
            raise RoleChangeError(f"worker {self.worker_id} is not running")
        self._role_reply = asyncio.get_running_loop().create_future()
        try:
            self._send(SetRole(role=role, token_budget=token_budget, max_num_seqs=max_num_seqs))
            reply = await asyncio.wait_for(self._role_reply, timeout_s)
        except asyncio.TimeoutError:
            raise RoleChangeError(f"worker {self.worker_id} did not answer SetRole({role}) in {timeout_s:g}s") \
                from None
        finally:
            self._role_reply = None
        if isinstance(reply, RoleRefused):
            raise RoleChangeError(f"worker {self.worker_id} refused to become {role}: {reply.reason}")
        self.ready = reply
        self.info = msgspec.structs.replace(self.info, role=reply.role)

    def send_shutdown(self) -> None:
        if self.dead_reason is None:
            self._send(Shutdown())

    def stats(self) -> EngineStats | None:
        return self._stats

    def update_stats(self, stats: EngineStats) -> None:
        self._stats = stats

    def is_healthy(self) -> bool:
        return self.dead_reason is None and self.ready is not None

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        self.mark_dead("closed")
        self._sock.close(linger=0)
        if self._own_ctx:
            self._ctx.term()
