"""`RequestDeadline`: one request's time limit while it waits on the engine (`ServerConfig.request_deadline_s`).

One timer per request, armed when its generation starts (`GenerationRun.steps`), not one per engine
step: a timeout around each wait costs ~7 us a streamed token, about what the whole frontend path
spends. When the timer fires while the request's task waits for the engine's next delta, it cancels
that wait (as a client disconnect would: the engine stream closes and the engine aborts the request,
freeing its KV) and `next_delta` raises `DeadlineExceeded` instead of the cancellation; when it
fires between waits, it marks the deadline passed and the next `next_delta` raises.

Lifecycle: `arm()` -> `next_delta(stream)` per delta (each from whichever task iterates the stream
then: a stream's first delta is awaited before its response starts, the rest by the response) ->
`disarm()` once the request finished, and in a finally. Not shared between requests.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from tidal.protocol import TokenDelta


class DeadlineExceeded(Exception):
    """The request ran past its deadline; the engine has been told to drop it."""

    def __init__(self, deadline_s: float) -> None:
        super().__init__(f"The request did not finish within the server's deadline of {deadline_s:g} s.")
        self.deadline_s = deadline_s


class RequestDeadline:
    def __init__(self, deadline_s: float | None, arrival_time: float) -> None:
        """`arrival_time`: time.monotonic() when the request arrived; the deadline counts from it."""
        self.deadline_s = deadline_s
        self.arrival_time = arrival_time
        self.passed = False
        self._task: asyncio.Task | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._waiting = False
        self._cancelled_wait = False

    def arm(self) -> None:
        if self.deadline_s is None:
            return
        left_s = self.arrival_time + self.deadline_s - time.monotonic()
        self._timer = asyncio.get_running_loop().call_later(max(left_s, 0.0), self._expire)

    def disarm(self) -> None:
        """No deadline from here on (the request finished, or its run ends)."""
        self.passed = False
        self._task = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def next_delta(self, stream: AsyncIterator[TokenDelta]) -> TokenDelta:
        """The stream's next delta; StopAsyncIteration at its end; DeadlineExceeded once past the deadline."""
        if self.passed:
            raise DeadlineExceeded(self.deadline_s)
        self._waiting = True
        self._task = asyncio.current_task()  # a stream's first wait and the rest run on different tasks
        try:
            return await anext(stream)
        except asyncio.CancelledError:
            if not self._cancelled_wait:
                raise
            self._cancelled_wait = False
            self._task.uncancel()
            raise DeadlineExceeded(self.deadline_s) from None
        finally:
            self._waiting = False

    def _expire(self) -> None:
        self.passed = True
        self._timer = None
        if self._waiting and self._task is not None:
            self._cancelled_wait = True
            self._task.cancel()
