"""Planner traffic over NATS: observations from the frontend, role flips back to it.

Subjects (under the deployment's namespace, like the event plane's):
- `tidal.<ns>.planner.observation`: the frontend publishes an `ObservationMessage` (its id and the
  planner `Observation` its `ObservationCollector` built) every observation interval; the planner
  subscribes. Fire and forget: a planner that is down misses some and decides on the next.
- `tidal.<ns>.planner.command`: the planner sends a `FlipCommand` as a NATS request; one frontend
  (queue group `frontends`) drains the worker, flips it and answers a `FlipReply`. The request's
  timeout covers the drain; no answer means no frontend took it (the planner counts a failure).
- `tidal.<ns>.router.session`: a frontend that pins a session to a worker publishes `SessionPinned`;
  every frontend keeps it, so the session's next turn goes there whichever frontend takes it.

`ControlPlane` is one `tidal.runtime.nats_client.NatsConnection` on the caller's event loop (the
frontend and the planner are asyncio programs); `connect()` waits until NATS answers, so either
side may start first. Payloads are msgpack (msgspec): the `tidal.protocol` control-plane messages,
the planner's `Observation` inside an `ObservationMessage`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import msgspec
import nats.errors

from tidal.config import PlaneConfig
from tidal.planner.types import Observation
from tidal.protocol import FlipCommand, FlipReply, ObservationMessage, SessionPinned
from tidal.runtime.nats_client import NatsConnection

logger = logging.getLogger(__name__)

OBSERVATION_TOPIC = "planner.observation"
COMMAND_TOPIC = "planner.command"
SESSION_TOPIC = "router.session"
FRONTEND_QUEUE = "frontends"
CONNECT_TIMEOUT_S = 60.0


class ControlPlane:
    def __init__(self, planes: PlaneConfig, name: str) -> None:
        self.nats = NatsConnection(planes, name)
        self.client = self.nats.client
        self.subject = self.nats.subject
        self._subscriptions: list = []

    async def connect(self, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        """Connect, waiting until NATS answers; TimeoutError after `timeout_s`."""
        await self.nats.connect(timeout_s)

    async def close(self) -> None:
        await self.nats.close()

    # ---- observations: frontend -> planner ----------------------------------------------------------
    async def publish_observation(self, frontend_id: str, observation: Observation) -> None:
        raw = msgspec.Raw(msgspec.msgpack.encode(observation))
        payload = msgspec.msgpack.encode(ObservationMessage(frontend_id=frontend_id, observation=raw))
        with contextlib.suppress(nats.errors.Error):  # reconnecting with a full buffer: this one is lost
            await self.client.publish(self.subject(OBSERVATION_TOPIC), payload)

    async def observations(self) -> AsyncIterator[tuple[str, Observation]]:
        """(frontend id, its observation) as they arrive."""
        decoder = msgspec.msgpack.Decoder(ObservationMessage)
        observation_decoder = msgspec.msgpack.Decoder(Observation)
        sub = await self.client.subscribe(self.subject(OBSERVATION_TOPIC))
        try:
            async for msg in sub.messages:
                try:
                    message = decoder.decode(msg.data)
                    observation = observation_decoder.decode(message.observation)
                except msgspec.DecodeError as exc:
                    logger.warning("undecodable observation skipped: %s", exc)
                    continue
                yield message.frontend_id, observation
        finally:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()

    # ---- session pins: frontend -> every frontend ---------------------------------------------------
    async def share_session_pins(self, router) -> None:
        """Publish the sessions `router` pins and keep the other frontends' pins in it, so a session's
        next turn goes to its worker whichever frontend takes it (as the replica bus does on one machine)."""
        decoder = msgspec.msgpack.Decoder(SessionPinned)
        subject = self.subject(SESSION_TOPIC)

        async def on_pin(msg) -> None:
            with contextlib.suppress(msgspec.DecodeError):
                pin = decoder.decode(msg.data)
                router.pin_session(pin.session_id, pin.worker_id)

        def publish(session_id: str, worker_id: str) -> None:
            payload = msgspec.msgpack.encode(SessionPinned(session_id=session_id, worker_id=worker_id))
            task = asyncio.ensure_future(self.client.publish(subject, payload))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # a lost pin costs a cache hit

        self._subscriptions.append(await self.client.subscribe(subject, cb=on_pin))
        router.on_session_pinned = publish

    # ---- flips: planner -> one frontend -> reply ----------------------------------------------------
    async def request_flip(self, command: FlipCommand, timeout_s: float) -> FlipReply:
        try:
            msg = await self.client.request(self.subject(COMMAND_TOPIC), msgspec.msgpack.encode(command),
                                            timeout=timeout_s)
        except nats.errors.NoRespondersError:
            return FlipReply(ok=False, error="no frontend is listening for planner commands")
        except nats.errors.TimeoutError:
            return FlipReply(ok=False, error=f"no answer from a frontend in {timeout_s:g}s")
        return msgspec.msgpack.decode(msg.data, type=FlipReply)

    async def serve_flips(self, handler: Callable[[FlipCommand], Awaitable[FlipReply]]) -> None:
        """Answer flip commands with `handler` (one at a time: one drain at a time) from now on."""
        decoder = msgspec.msgpack.Decoder(FlipCommand)
        lock = asyncio.Lock()

        async def on_command(msg) -> None:
            try:
                command = decoder.decode(msg.data)
            except msgspec.DecodeError as exc:
                reply = FlipReply(ok=False, error=f"bad command: {exc}")
            else:
                async with lock:
                    reply = await handler(command)
            with contextlib.suppress(nats.errors.Error):
                await msg.respond(msgspec.msgpack.encode(reply))

        # nats-py runs a subscription's callbacks one after another; a flip's drain may take minutes,
        # so each command runs in its own task.
        tasks: set[asyncio.Task] = set()

        async def dispatch(msg) -> None:
            task = asyncio.create_task(on_command(msg))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        self._subscriptions.append(await self.client.subscribe(self.subject(COMMAND_TOPIC), queue=FRONTEND_QUEUE,
                                                               cb=dispatch))
