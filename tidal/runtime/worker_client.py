"""The client side of the request plane for one worker (an `EngineClient`: the router holds one per
worker, and a frontend may use one directly).

Owns one ZMQ DEALER socket connected to the worker's ROUTER and one asyncio reader task that
routes each `TokenDelta` to its request's queue. It does not own the worker process: whoever
started the worker (the launcher) watches it and calls `mark_dead` when it exits.
Lifecycle: `start()` (Connect, wait for WorkerReady) -> `generate()` many times -> `close()`.
Once dead, every open request ends with `EngineDeadError` and `is_healthy()` is False.
With CURVE keys (`tidal.curve`) the socket dials the worker as a CURVE client; a worker that
does not accept them never answers `Connect` (`start()` times out).
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

from tidal import curve
from tidal.curve import CurveKeys
from tidal.errors import EngineDeadError, RoleChangeError
from tidal.protocol import (AbortRequest, AddRequest, Connect, EngineStats, ForgetClient, KVDump, KVDumpRequest,
                            ReleaseKV, Role, RoleRefused, SetDraining, SetRole, Shutdown, StepOutputs, TokenDelta,
                            WorkerDraining, WorkerGone, WorkerInfo, WorkerLeaving, WorkerMessage, WorkerReady)

logger = logging.getLogger(__name__)


class _Dead:
    """Queue sentinel: the worker is gone."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


class _Mailbox:
    """One request's deltas not yet taken by its stream; the stream takes all of them at once.

    Lighter than an `asyncio.Queue` (no getter deque, no put side). `put_nowait` keeps the
    name `mark_dead` calls.
    """

    __slots__ = ("items", "waiter")

    def __init__(self) -> None:
        self.items: list[TokenDelta | _Dead] = []
        self.waiter: asyncio.Future | None = None

    def put_nowait(self, item: TokenDelta | _Dead) -> None:
        self.items.append(item)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def take(self) -> list[TokenDelta | _Dead]:
        if not self.items:
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        items, self.items = self.items, []
        return items


def coalesce(items: list) -> list:
    """Merges runs of a request's ready deltas into one (the stream fell behind its worker), so
    everything above it handles, and the client reads, one event for all of them. A delta that
    carries more than tokens (an error, KV for a decode worker, first-step timings) is not
    folded into the one before it, and nothing is folded into a finished one."""
    if len(items) == 1:
        return items
    out: list = []
    for item in items:
        prev = out[-1] if out else None
        if prev is not None and _can_merge(prev, item):
            logprobs = None if prev.logprobs is None else prev.logprobs + item.logprobs
            out[-1] = msgspec.structs.replace(
                item, new_token_ids=prev.new_token_ids + item.new_token_ids, logprobs=logprobs,
                num_cached_tokens=max(prev.num_cached_tokens, item.num_cached_tokens),
                queue_s=prev.queue_s, kv_transfer_s=prev.kv_transfer_s)
        else:
            out.append(item)
    return out


def _can_merge(prev, item) -> bool:
    return (isinstance(prev, TokenDelta) and isinstance(item, TokenDelta) and not prev.finished
            and prev.error is None and item.error is None and item.finish_reason != "error"
            and prev.kv_transfer_params is None and item.kv_transfer_params is None
            and item.queue_s is None and item.kv_transfer_s is None
            and (prev.logprobs is None) == (item.logprobs is None))


class WorkerClient:
    def __init__(self, info: WorkerInfo, ctx: zmq.asyncio.Context | None = None, client_tag: str = "",
                 keys: CurveKeys | None = None):
        """`client_tag`: the start of this socket's id at the worker (a frontend process's tag), so the
        launcher can have the worker forget every request of a frontend process that died. `keys`:
        dial with CURVE (cluster mode with `curve_key_dir`)."""
        self.info = info
        self._own_ctx = ctx is None
        self._ctx = ctx or zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.IDENTITY, f"{client_tag}{info.worker_id}:{uuid.uuid4().hex[:12]}".encode())
        curve.dial(keys, self._sock)
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(WorkerMessage)
        self._queues: dict[str, _Mailbox] = {}
        self._stats: EngineStats | None = None
        self._role_reply: asyncio.Future | None = None
        self._reader: asyncio.Task | None = None
        self.dead_reason: str | None = None
        self.leaving = False  # the worker said it is leaving (SIGTERM): send it nothing new
        self.drained = False  # a router drained it (`SetDraining`, told to every client): send it nothing new
        self.on_change: Callable[[], None] | None = None  # its role or drained state changed
        self.ready: WorkerReady | None = None
        self.on_dump: Callable[[KVDump], None] | None = None  # answers to `request_dump`
        self.on_leaving: Callable[[WorkerLeaving], None] | None = None

    @property
    def worker_id(self) -> str:
        return self.info.worker_id

    @property
    def role(self) -> Role:
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
                    self.drained = msg.draining
        self._reader = asyncio.create_task(self._read_outputs())

    async def _read_outputs(self) -> None:
        while True:
            msg = self._decoder.decode(await self._sock.recv())
            if isinstance(msg, StepOutputs):  # nearly every message: test it first
                if msg.stats is not None:
                    self.update_stats(msg.stats)
                queues = self._queues
                for delta in msg.deltas:
                    mailbox = queues.get(delta.request_id)
                    if mailbox is not None:
                        mailbox.put_nowait(delta)
                continue
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
            if isinstance(msg, (WorkerReady, RoleRefused, WorkerDraining)):
                self._on_worker_state(msg)

    def _on_worker_state(self, msg: WorkerReady | RoleRefused | WorkerDraining) -> None:
        """An answer to our `SetRole`, or the worker telling every client its new role or drain state."""
        if isinstance(msg, WorkerDraining):
            self.drained = msg.draining
        elif self._role_reply is not None and not self._role_reply.done():
            self._role_reply.set_result(msg)
            return
        elif isinstance(msg, WorkerReady):  # another router flipped it
            self.ready = msg
            self.info = msgspec.structs.replace(self.info, role=msg.role)
        if self.on_change is not None:
            self.on_change()

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
        mailbox = _Mailbox()
        self._queues[request.request_id] = mailbox
        finished = False
        try:
            self._send(request)
            while not finished:
                # When the stream fell behind (the event loop was busy), every delta that came
                # meanwhile is taken and merged: one step up the stack for all of them.
                for delta in coalesce(await mailbox.take()):
                    if isinstance(delta, _Dead):
                        raise EngineDeadError(f"worker {self.worker_id} died while serving this "
                                              f"request ({delta.reason})")
                    finished = delta.finished
                    yield delta
                    if finished:
                        break
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

    async def set_role(self, role: Role, timeout_s: float = 10.0, token_budget: int | None = None,
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

    def set_draining(self, draining: bool) -> None:
        """Drain the worker (or end the drain) for every router: the worker tells all its clients."""
        if self.dead_reason is None:
            self.drained = draining
            self._send(SetDraining(draining=draining))

    def forget_client(self, client_prefix: str) -> None:
        """Have the worker abort every request sent by sockets whose id starts with `client_prefix`."""
        if self.dead_reason is None:
            self._send(ForgetClient(client_prefix=client_prefix))

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
