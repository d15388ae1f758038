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

`ControlPlane` is one NATS connection on the caller's event loop (the frontend and the planner are
asyncio programs). `connect()` retries until NATS answers, so either side may start first; after
that nats-py reconnects by itself. Payloads are msgpack (msgspec), the planner's own dataclasses
inside.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import msgspec
import nats
import nats.errors

from tidal.planner.types import Observation
from tidal.protocol import Role, SessionPinned
from tidal.runtime.cluster import ClusterConfig

logger = logging.getLogger(__name__)

OBSERVATION_TOPIC = "planner.observation"
COMMAND_TOPIC = "planner.command"
SESSION_TOPIC = "router.session"
FRONTEND_QUEUE = "frontends"
CONNECT_RETRY_S = 0.5


class ObservationMessage(msgspec.Struct, frozen=True, kw_only=True):
    frontend_id: str
    observation: Observation


class FlipCommand(msgspec.Struct, frozen=True, kw_only=True):
    worker_id: str
    role: Role
    token_budget: int | None = None  # the new role's scheduler limits (None: the worker keeps its own)
    max_num_seqs: int | None = None


class FlipReply(msgspec.Struct, frozen=True, kw_only=True):
    ok: bool
    error: str = ""
    drain_s: float = 0.0
    unavailable_s: float = 0.0
    total_s: float = 0.0


class ControlPlane:
    def __init__(self, cluster: ClusterConfig, name: str) -> None:
        if not cluster.nats_servers:
            raise ValueError("the planner's traffic needs NATS (--nats URL)")
        self.cluster = cluster
        self.name = name
        self.client = nats.NATS()
        self._subscriptions: list = []

    def subject(self, topic: str) -> str:
        return f"tidal.{self.cluster.namespace}.{topic}"

    async def connect(self, timeout_s: float = 60.0) -> None:
        """Connect, retrying every CONNECT_RETRY_S until NATS answers; TimeoutError after `timeout_s`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            try:
                await self.client.connect(servers=self.cluster.nats_servers, name=self.name, allow_reconnect=True,
                                          max_reconnect_attempts=-1, reconnect_time_wait=CONNECT_RETRY_S,
                                          connect_timeout=2)
                return
            except (nats.errors.Error, OSError) as exc:
                if loop.time() > deadline:
                    raise TimeoutError(f"NATS at {self.cluster.nats_url} did not answer: {exc}") from None
                await asyncio.sleep(CONNECT_RETRY_S)

    async def close(self) -> None:
        if self.client.is_connected or self.client.is_reconnecting:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.client.close(), 2.0)

    # ---- observations: frontend -> planner ----------------------------------------------------------
    async def publish_observation(self, frontend_id: str, observation: Observation) -> None:
        payload = msgspec.msgpack.encode(ObservationMessage(frontend_id=frontend_id, observation=observation))
        with contextlib.suppress(nats.errors.Error):  # reconnecting with a full buffer: this one is lost
            await self.client.publish(self.subject(OBSERVATION_TOPIC), payload)

    async def observations(self) -> AsyncIterator[ObservationMessage]:
        decoder = msgspec.msgpack.Decoder(ObservationMessage)
        sub = await self.client.subscribe(self.subject(OBSERVATION_TOPIC))
        try:
            async for msg in sub.messages:
                try:
                    yield decoder.decode(msg.data)
                except msgspec.DecodeError as exc:
                    logger.warning("undecodable observation skipped: %s", exc)
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
