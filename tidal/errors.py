"""Errors that cross layers: raised below (the worker client, the router) and answered above (the
frontend maps them to HTTP, the planner's actuators to a failed action). Imports nothing of Tidal.
"""

from __future__ import annotations


class EngineDeadError(RuntimeError):
    """The engine behind a client stopped; requests in flight fail with this."""


class OverloadedError(RuntimeError):
    """Refused for now (the router's queue is full, or the request waited too long): 503 with
    Retry-After."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RoleChangeError(RuntimeError):
    """A worker refused (or did not answer) a `SetRole`; its role is unchanged."""
