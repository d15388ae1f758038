"""The one NATS client of the package: how a process connects, reconnects, names subjects and closes.

`NatsConnection` is one connection on the caller's asyncio loop (the frontend's and the planner's
control plane: observations, flips, session pins). `NatsThread` is one on a private loop in a
daemon thread, for synchronous callers (a worker's engine loop publishing events) and for the event
subscriber that must not share the consumer's loop with a slow NATS.

Reconnects: nats-py reconnects forever, every `RECONNECT_WAIT_S`, and re-sends subscriptions
itself; the first connection is retried the same way, so a component may start before NATS does.
While disconnected, publishes go into nats-py's pending buffer (sent on reconnect) until it is full.

Credentials (`PlaneConfig.nats_auth`: a user and password, a token or a creds file; TLS files)
are read from their files when connecting (`tidal.runtime.credentials`). A server that refuses
them is logged as an error and retried like an unreachable one.

Subjects: `tidal.<namespace>.<token>...`; a token's `.`, `*`, `>` and whitespace become `_`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import re
import threading
from collections.abc import Coroutine

import nats
import nats.errors

from tidal.config import PlaneConfig
from tidal.runtime.credentials import nats_options

logger = logging.getLogger(__name__)

RECONNECT_WAIT_S = 0.5
CONNECT_TIMEOUT_S = 2
PING_INTERVAL_S = 10  # a silently dead server is noticed after two unanswered pings
CLOSE_TIMEOUT_S = 2.0
_UNSAFE_SUBJECT_CHARS = re.compile(r"[.*>\s]")


def subject_token(name: str) -> str:
    """`name` as one NATS subject token."""
    return _UNSAFE_SUBJECT_CHARS.sub("_", name) or "_"


def namespace_subject(namespace: str, topic: str) -> str:
    """`tidal.<namespace>.<topic>` (`topic` may hold several dot-separated tokens)."""
    return f"tidal.{namespace}.{topic}"


class NatsConnection:
    """One NATS connection on the caller's loop: `connect()`, use `client`, `close()`."""

    def __init__(self, planes: PlaneConfig, name: str) -> None:
        if not planes.nats_servers:
            raise ValueError(f"{name} needs NATS (--nats URL)")
        self.planes = planes
        self.name = name
        self.client = nats.NATS()
        self.connected = threading.Event()  # set once the first connection is up (any thread may wait)

    def subject(self, topic: str) -> str:
        return namespace_subject(self.planes.namespace, topic)

    async def connect(self, timeout_s: float | None = None) -> None:
        """Connect (nats-py retries until NATS answers); TimeoutError after `timeout_s` if given."""
        connecting = self.client.connect(
            servers=self.planes.nats_servers, name=self.name, allow_reconnect=True, max_reconnect_attempts=-1,
            reconnect_time_wait=RECONNECT_WAIT_S, connect_timeout=CONNECT_TIMEOUT_S,
            ping_interval=PING_INTERVAL_S, max_outstanding_pings=2, error_cb=self._on_error,
            disconnected_cb=self._on_disconnected, reconnected_cb=self._on_reconnected,
            **nats_options(self.planes.nats_auth))
        try:
            await asyncio.wait_for(connecting, timeout_s)
        except TimeoutError:
            raise TimeoutError(f"NATS at {self.planes.nats_url} did not answer in {timeout_s:g}s") from None
        self.connected.set()
        logger.debug("%s: connected to NATS at %s", self.name, self.client.connected_url)

    async def close(self) -> None:
        if self.client.is_connected or self.client.is_reconnecting:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.client.close(), CLOSE_TIMEOUT_S)

    async def _on_error(self, exc: Exception) -> None:
        if isinstance(exc, nats.errors.AuthorizationError):
            logger.error("%s: NATS refused this process's credentials (cluster.nats_auth); retrying", self.name)
            return
        logger.debug("%s: NATS error: %s", self.name, exc)

    async def _on_disconnected(self) -> None:
        if self.connected.is_set():
            logger.warning("%s: disconnected from NATS; reconnecting every %gs", self.name, RECONNECT_WAIT_S)

    async def _on_reconnected(self) -> None:
        logger.info("%s: reconnected to NATS at %s", self.name, self.client.connected_url)


class NatsThread:
    """A `NatsConnection` on an asyncio loop in a daemon thread; lives until `close()`."""

    def __init__(self, planes: PlaneConfig, name: str) -> None:
        self.connection = NatsConnection(planes, name)
        self.client = self.connection.client
        self.connected = self.connection.connected
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self.ready = asyncio.Event()  # the same as `connected`, for coroutines on the NATS loop
        self._connecting = self.submit(self._connect())

    def submit(self, coro: Coroutine) -> concurrent.futures.Future:
        """Run `coro` on the NATS loop (callable from any thread)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        with contextlib.suppress(concurrent.futures.TimeoutError, RuntimeError):
            self.submit(self._close()).result(CLOSE_TIMEOUT_S)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(CLOSE_TIMEOUT_S)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
            # Stopped by `close()`: end what is left (the sender, reconnect attempts, reads).
            tasks = asyncio.all_tasks(self.loop)
            for task in tasks:
                task.cancel()
            self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        finally:
            self.loop.close()

    async def _connect(self) -> None:
        await self.connection.connect()
        self.ready.set()

    async def _close(self) -> None:
        self._connecting.cancel()  # still trying to connect the first time: stop
        await self.connection.close()
