"""The frontend's view of an engine: submit a request, stream its deltas, abort it.

`EngineClient` is the interface the HTTP layer codes against (the errors it raises,
`EngineDeadError` and `OverloadedError`, live in `tidal.errors`). Implementations:
`tidal.runtime.worker_client.WorkerClient` (one worker process, over the ZMQ request plane) and
`tidal.router.service.Router` (every worker discovery lists: routing, disaggregation).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from tidal.protocol import AddRequest, EngineStats, TokenDelta


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
