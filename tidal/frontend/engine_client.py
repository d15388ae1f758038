"""The frontend's view of an engine: submit a request, stream its deltas, abort it.

`EngineClient` is the interface the HTTP layer codes against. Implementations:
`tidal.worker.client.WorkerClient` (one worker process, over the ZMQ request plane) and
`tidal.router.service.Router` (every worker discovery lists: routing, disaggregation).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from tidal.protocol import AddRequest, EngineStats, TokenDelta


class EngineDeadError(RuntimeError):
    """The engine behind a client stopped; requests in flight fail with this."""


class OverloadedError(RuntimeError):
    """Refused for now (the router's queue is full, or the request waited too long): 503 with
    Retry-After."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineClient(Protocol):
    max_model_len: int
    """Prompt + output tokens one request may hold."""

    def generate(self, request: AddRequest) -> AsyncIterator[TokenDelta]:
        """Yields the request's deltas until one has `finished=True`.

        Closing the iterator early (break, aclose, task cancelled on client disconnect) aborts
        the request in the engine, which frees its KV blocks.
        """
        ...

    async def abort(self, request_id: str) -> None: ...

    def stats(self) -> EngineStats | None:
        """Latest load snapshot the engine reported (None before the first step)."""
        ...

    def is_healthy(self) -> bool: ...
