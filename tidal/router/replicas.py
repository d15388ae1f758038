"""The replica bus: what the router replicas of one `tidal serve` tell each other.

Each frontend process runs its own `Router` (a replica): every replica follows the same discovery,
the same KV events and load reports, so the KV-aware choice agrees without talking. Two things a
replica learns only from requests, and shares on this bus:
- session pins (topic `session`): the worker a session's request went to; the other replicas keep
  that session there too, so a conversation stays on its worker whichever process takes a turn;
- the request log (topic `log`): arrivals and finished requests (TTFT, ITL, lengths) every
  `LOG_INTERVAL_S`, for the planner's router in the launcher process (`RequestLogFeed`).

`ReplicaBusProxy` (launcher side) is a ZMQ XSUB/XPUB forwarder on a thread: replicas publish to its
`in_address` and subscribe at its `out_address`. Delivery is best effort (PUB/SUB): a pin lost at
start-up costs one turn's prefix-cache hit, nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator

import msgspec
import zmq
import zmq.asyncio

from tidal.protocol import FinishedRecord, ReplicaBusMessage, RequestLogBatch, SessionPinned
from tidal.fleet_snapshot import FinishedRequest
from tidal.router.request_log import RequestLog

logger = logging.getLogger(__name__)

LOG_INTERVAL_S = 0.5
SESSION_TOPIC = b"session"
LOG_TOPIC = b"log"


async def _messages(sock, decoder) -> AsyncIterator:
    """The bus messages a SUB socket receives, decoded (a newer peer's unknown ones skipped)."""
    while True:
        _topic, raw = await sock.recv_multipart()
        try:
            yield decoder.decode(raw)
        except msgspec.DecodeError:
            continue


class ReplicaBusProxy:
    """Forwards every replica's messages to every replica (a thread running `zmq.proxy`)."""

    def __init__(self, in_address: str, out_address: str) -> None:
        self._ctx = zmq.Context()
        self._in = self._ctx.socket(zmq.XSUB)
        self._out = self._ctx.socket(zmq.XPUB)
        for sock in (self._in, self._out):
            sock.setsockopt(zmq.LINGER, 0)
        self._in.bind(in_address)
        self._out.bind(out_address)
        self.in_address = self._in.getsockopt_string(zmq.LAST_ENDPOINT)
        self.out_address = self._out.getsockopt_string(zmq.LAST_ENDPOINT)
        self._thread = threading.Thread(target=self._run, name="tidal-replica-bus", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            zmq.proxy(self._in, self._out)
        except (zmq.ContextTerminated, zmq.ZMQError):
            pass
        finally:  # sockets belong to this thread: close them here, so `term()` can return
            self._in.close(linger=0)
            self._out.close(linger=0)

    def close(self) -> None:
        self._ctx.term()  # the proxy gets ETERM, closes its sockets and ends
        self._thread.join(timeout=5)


class ReplicaBus:
    """One replica's end: publishes its session pins and request log, applies the others' pins."""

    def __init__(self, router, in_address: str, out_address: str, frontend_id: str) -> None:
        self.router = router
        self.frontend_id = frontend_id
        self._ctx = zmq.asyncio.Context()
        self._pub = self._ctx.socket(zmq.PUB)
        self._sub = self._ctx.socket(zmq.SUB)
        for sock in (self._pub, self._sub):
            sock.setsockopt(zmq.LINGER, 0)
        self._pub.connect(in_address)
        self._sub.connect(out_address)
        self._sub.setsockopt(zmq.SUBSCRIBE, SESSION_TOPIC)
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(ReplicaBusMessage)
        self._tasks: list[asyncio.Task] = []
        self._log_since = time.monotonic()
        self._arrivals_seen = router.request_log.arrivals_total

    async def start(self) -> None:
        self.router.on_session_pinned = self.publish_pin
        self._tasks = [asyncio.create_task(self._follow_pins()), asyncio.create_task(self._publish_log())]

    async def close(self) -> None:
        self.router.on_session_pinned = None
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._pub.close(linger=0)
        self._sub.close(linger=0)
        self._ctx.term()

    def publish_pin(self, session_id: str, worker_id: str) -> None:
        msg = SessionPinned(session_id=session_id, worker_id=worker_id)
        with contextlib.suppress(zmq.Again):
            self._pub.send_multipart([SESSION_TOPIC, self._encoder.encode(msg)], zmq.NOBLOCK)

    async def _follow_pins(self) -> None:
        async for msg in _messages(self._sub, self._decoder):
            if isinstance(msg, SessionPinned):
                self.router.pin_session(msg.session_id, msg.worker_id)

    async def _publish_log(self) -> None:
        while True:
            await asyncio.sleep(LOG_INTERVAL_S)
            self.flush_log()

    def flush_log(self) -> None:
        log: RequestLog = self.router.request_log
        finished = log.since(self._log_since)
        arrivals = log.arrivals_total - self._arrivals_seen
        if not finished and not arrivals:
            return
        if finished:
            self._log_since = finished[-1].finished_at
        self._arrivals_seen = log.arrivals_total
        batch = RequestLogBatch(frontend_id=self.frontend_id, arrivals=arrivals,
                                queue_depth=self.router.queue_length,
                                finished=[FinishedRecord(f.finished_at, f.ttft_s, f.itl_s, f.prompt_tokens,
                                                         f.cached_tokens, f.output_tokens) for f in finished])
        with contextlib.suppress(zmq.Again):
            self._pub.send_multipart([LOG_TOPIC, self._encoder.encode(batch)], zmq.NOBLOCK)


class RequestLogFeed:
    """Launcher side: every replica's request log, merged into one `RequestLog` (the planner's)."""

    def __init__(self, request_log: RequestLog, out_address: str) -> None:
        self.request_log = request_log
        self.queue_depths: dict[str, int] = {}  # frontend id -> its router's queue at its last batch
        self._ctx = zmq.asyncio.Context()
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.connect(out_address)
        self._sub.setsockopt(zmq.SUBSCRIBE, LOG_TOPIC)
        self._decoder = msgspec.msgpack.Decoder(ReplicaBusMessage)
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._follow())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._sub.close(linger=0)
        self._ctx.term()

    @property
    def queue_depth(self) -> int:
        return sum(self.queue_depths.values())

    async def _follow(self) -> None:
        async for msg in _messages(self._sub, self._decoder):
            if isinstance(msg, RequestLogBatch):
                self.apply(msg)

    def apply(self, batch: RequestLogBatch) -> None:
        self.request_log.arrivals_total += batch.arrivals
        self.queue_depths[batch.frontend_id] = batch.queue_depth
        if not batch.finished:
            return
        finished = self.request_log.finished
        new = [FinishedRequest(f.finished_at, f.ttft_s, f.itl_s, f.prompt_tokens, f.cached_tokens, f.output_tokens)
               for f in batch.finished]
        if finished and new[0].finished_at < finished[-1].finished_at:
            # Replicas send every LOG_INTERVAL_S, so batches interleave: keep the log in time order
            # (`RequestLog.since` reads it newest first and stops at the first older entry).
            merged = sorted([*finished, *new], key=lambda f: f.finished_at)
            finished.clear()
            finished.extend(merged)
        else:
            finished.extend(new)
