"""The event plane: workers publish typed events by topic; frontends and planners subscribe.

Interfaces (`EventPublisher`, `EventSubscriber`) with the embedded implementation: ZMQ PUB/SUB,
each worker binding its own PUB socket and subscribers connecting to every worker they learn of
from discovery. `tidal.runtime.nats_events` has the NATS implementation of the same two
interfaces; `tidal.runtime.planes` picks one.
Events are msgspec-encoded `tidal.protocol.EventMessage` values, one topic frame before each.
With CURVE keys (`tidal.curve`, cluster mode with `curve_key_dir`) a publisher serves with the
cluster's keys and admits only the subscribers they allow; subscribers dial with them.
Delivery is best effort (a subscriber that connects late misses what came before); consumers
that need a complete picture ask for a resync (KV events, issue 4).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Protocol

import msgspec
import zmq
import zmq.asyncio

from tidal import curve
from tidal.curve import CurveKeys
from tidal.protocol import EventMessage


class EventPublisher(Protocol):
    def publish(self, topic: str, event: EventMessage) -> None: ...

    def close(self) -> None: ...


class EventSubscriber(Protocol):
    def connect(self, source_id: str, address: str) -> None:
        """Start receiving the events of one source (a worker's event endpoint)."""

    def disconnect(self, source_id: str) -> None: ...

    def events(self) -> AsyncIterator[tuple[str, EventMessage]]:
        """(topic, event) pairs as they arrive, from every connected source."""

    def close(self) -> None: ...


class ZmqEventPublisher:
    """A bound PUB socket (synchronous: used from the worker's loop). With `keys` and a `ctx` of
    the caller's, the caller runs that context's `curve.Authenticator`."""

    def __init__(self, address: str, ctx: zmq.Context | None = None, keys: CurveKeys | None = None) -> None:
        self._own_ctx = ctx is None
        self._ctx = ctx or zmq.Context()
        self._auth = curve.Authenticator(self._ctx, keys if self._own_ctx else None)
        self._sock = self._ctx.socket(zmq.PUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDHWM, 10_000)
        curve.serve(keys, self._sock)
        self._sock.bind(address)
        self.address = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._encoder = msgspec.msgpack.Encoder()

    def publish(self, topic: str, event: EventMessage) -> None:
        with contextlib.suppress(zmq.Again):
            self._sock.send_multipart([topic.encode(), self._encoder.encode(event)], zmq.NOBLOCK)

    def close(self) -> None:
        self._sock.close(linger=0)
        self._auth.stop()
        if self._own_ctx:
            self._ctx.term()


class ZmqEventSubscriber:
    """One SUB socket connected to many publishers (asyncio)."""

    def __init__(self, topics: tuple[str, ...] = ("",), keys: CurveKeys | None = None) -> None:
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        curve.dial(keys, self._sock)
        for topic in topics:
            self._sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
        self._addresses: dict[str, str] = {}
        self._decoder = msgspec.msgpack.Decoder(EventMessage)

    def connect(self, source_id: str, address: str) -> None:
        if source_id in self._addresses:
            return
        self._addresses[source_id] = address
        self._sock.connect(address)

    def disconnect(self, source_id: str) -> None:
        address = self._addresses.pop(source_id, None)
        if address is not None:
            with contextlib.suppress(zmq.ZMQError):
                self._sock.disconnect(address)

    async def events(self) -> AsyncIterator[tuple[str, EventMessage]]:
        while True:
            topic, raw = await self._sock.recv_multipart()
            try:
                yield topic.decode(), self._decoder.decode(raw)
            except msgspec.DecodeError:
                continue  # a newer peer's event type: skip it

    def close(self) -> None:
        self._sock.close(linger=0)
        self._ctx.term()


async def cancel_and_wait(task: asyncio.Task | None) -> None:
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
