"""The event plane over NATS: the same `EventPublisher`/`EventSubscriber` as the ZMQ one.

Subjects: `tidal.<namespace>.<topic>.<source_id>` (a source id's `.`, `*`, `>` and whitespace
become `_`, as subject tokens can't hold them). Payloads are msgspec-msgpack `EventMessage`s, as
over ZMQ. Delivery is best effort, as over ZMQ: what is published while a side is disconnected
may be lost, and the KV event ids let the router notice the gap and resync from a dump.

Threads: each publisher and subscriber owns one NATS connection on a private asyncio loop in a
daemon thread (`tidal.runtime.nats_client.NatsThread`). The publisher is called from the worker's
synchronous engine loop: `publish` encodes, hands the message to that loop (`call_soon_threadsafe`)
and returns; a bounded queue there feeds the connection and drops when full, so a slow or absent
NATS never blocks a step. The subscriber's `connect`/`disconnect` are sync too (they schedule
(un)subscribes on the NATS thread, in order); messages cross back to the consumer's loop, where
`events()` decodes them. Reconnects: see `tidal.runtime.nats_client`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import msgspec
import nats.errors

from tidal.config import PlaneConfig
from tidal.protocol import EventMessage
from tidal.runtime.nats_client import NatsThread, namespace_subject, subject_token

logger = logging.getLogger(__name__)

MAX_QUEUED = 10_000  # messages waiting between a caller and the connection; more are dropped


def event_subject(namespace: str, topic: str, source_id: str) -> str:
    return namespace_subject(namespace, f"{subject_token(topic)}.{subject_token(source_id)}")


class NatsEventPublisher:
    """One source's publisher (thread-safe, never blocks). `address` is what the source
    advertises as its event endpoint (subscribers need only its id)."""

    def __init__(self, planes: PlaneConfig, source_id: str) -> None:
        if not planes.nats_servers:
            raise ValueError("NatsEventPublisher needs a NATS URL")
        self.namespace = planes.namespace
        self.source_id = source_id
        self.address = f"nats:tidal.{self.namespace}.*.{subject_token(source_id)}"
        self.dropped = 0  # messages dropped (queue full, or the connection refused them)
        self._encoder = msgspec.msgpack.Encoder()
        self._subjects: dict[str, str] = {}
        self._nats = NatsThread(planes, f"tidal-events-pub-{source_id}")
        self._queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(MAX_QUEUED)
        self._sender = self._nats.submit(self._send_forever())

    def wait_connected(self, timeout_s: float) -> bool:
        return self._nats.connected.wait(timeout_s)

    def publish(self, topic: str, event: EventMessage) -> None:
        subject = self._subjects.get(topic)
        if subject is None:
            subject = self._subjects[topic] = event_subject(self.namespace, topic, self.source_id)
        payload = self._encoder.encode(event)
        with contextlib.suppress(RuntimeError):  # closed
            self._nats.loop.call_soon_threadsafe(self._enqueue, subject, payload)

    def close(self) -> None:
        self._sender.cancel()
        self._nats.close()

    def _enqueue(self, subject: str, payload: bytes) -> None:
        if not self._nats.connected.is_set():
            self.dropped += 1  # not connected yet: nobody could have subscribed through us anyway
            return
        try:
            self._queue.put_nowait((subject, payload))
        except asyncio.QueueFull:
            self.dropped += 1

    async def _send_forever(self) -> None:
        while True:
            subject, payload = await self._queue.get()
            try:
                await self._nats.client.publish(subject, payload)
            except nats.errors.Error as exc:  # buffer full while reconnecting, connection closed
                self.dropped += 1
                if self.dropped % 1000 == 1:
                    logger.warning("events of %s: dropped %d so far (%s)", self.source_id, self.dropped, exc)


class NatsEventSubscriber:
    """Subscribes to the topics of each connected source (asyncio consumer; `connect`,
    `disconnect` and `close` may be called from the consumer's loop, they do not block it)."""

    def __init__(self, planes: PlaneConfig, topics: tuple[str, ...] = ("",)) -> None:
        if not planes.nats_servers:
            raise ValueError("NatsEventSubscriber needs a NATS URL")
        self.namespace = planes.namespace
        self.topics = tuple(sorted({subject_token(t) if t else "*" for t in topics}))
        self.dropped = 0
        self._sources: dict[str, str] = {}  # subject token -> source id (consumer side)
        self._subscriptions: dict[str, list] = {}  # source id -> its NATS subscriptions (NATS thread)
        self._decoder = msgspec.msgpack.Decoder(EventMessage)
        self._queue: asyncio.Queue[tuple[str, str, bytes]] = asyncio.Queue(MAX_QUEUED * 10)
        self._consumer: asyncio.AbstractEventLoop | None = None
        self._nats = NatsThread(planes, "tidal-events-sub")
        self._ops = asyncio.Lock()  # (un)subscribes run on the NATS loop one at a time, in call order

    def wait_connected(self, timeout_s: float) -> bool:
        return self._nats.connected.wait(timeout_s)

    def connect(self, source_id: str, address: str = "") -> None:
        """Receive `source_id`'s events; the address is not needed (subjects name the source)."""
        token = subject_token(source_id)
        if token in self._sources:
            return
        self._sources[token] = source_id
        self._bind_consumer()
        self._nats.submit(self._subscribe(source_id, token))

    def disconnect(self, source_id: str) -> None:
        if self._sources.pop(subject_token(source_id), None) is not None:
            self._nats.submit(self._unsubscribe(source_id))

    async def events(self) -> AsyncIterator[tuple[str, EventMessage]]:
        self._bind_consumer()
        while True:
            topic, token, raw = await self._queue.get()
            if token not in self._sources:
                continue  # disconnected while the message was on its way
            try:
                yield topic, self._decoder.decode(raw)
            except msgspec.DecodeError:
                continue  # a newer peer's event type: skip it

    def close(self) -> None:
        self._sources.clear()
        self._nats.close()

    def _bind_consumer(self) -> None:
        with contextlib.suppress(RuntimeError):  # no running loop: bound by the first call that has one
            self._consumer = self._consumer or asyncio.get_running_loop()

    # ---- on the NATS thread ------------------------------------------------------------------------
    async def _subscribe(self, source_id: str, token: str) -> None:
        async with self._ops:
            await self._nats.ready.wait()
            subjects = [f"tidal.{self.namespace}.{topic}.{token}" for topic in self.topics]
            self._subscriptions[source_id] = [await self._nats.client.subscribe(s, cb=self._on_message)
                                              for s in subjects]

    async def _unsubscribe(self, source_id: str) -> None:
        async with self._ops:
            for subscription in self._subscriptions.pop(source_id, []):
                with contextlib.suppress(nats.errors.Error):
                    await subscription.unsubscribe()

    async def _on_message(self, msg) -> None:
        _, _, topic, token = msg.subject.split(".", 3)
        if self._consumer is None:
            return
        with contextlib.suppress(RuntimeError):  # the consumer's loop is closed
            self._consumer.call_soon_threadsafe(self._deliver, topic, token, msg.data)

    def _deliver(self, topic: str, token: str, raw: bytes) -> None:
        try:
            self._queue.put_nowait((topic, token, raw))
        except asyncio.QueueFull:
            self.dropped += 1
