"""The session table: which worker each conversation (`RoutingHints.session_id`) is pinned to.

Owns a bounded, least-recently-pinned-first map of session id -> worker id. Pins come from this
router's own decisions and from the other router replicas (the replica bus, or the cluster's
control plane). At most `max_sessions` are kept; the oldest pin goes first. A pin to a worker that
is gone or full is simply not followed (`policy.session_worker`).
"""

from __future__ import annotations

from collections import OrderedDict

SESSIONS_MAX = 100_000


class SessionTable:
    def __init__(self, max_sessions: int = SESSIONS_MAX) -> None:
        self.max_sessions = max_sessions
        self._pins: OrderedDict[str, str] = OrderedDict()  # session id -> worker id

    def get(self, session_id: str) -> str | None:
        return self._pins.get(session_id)

    def pin(self, session_id: str, worker_id: str) -> None:
        self._pins[session_id] = worker_id
        self._pins.move_to_end(session_id)
        if len(self._pins) > self.max_sessions:
            self._pins.popitem(last=False)

    def __len__(self) -> int:
        return len(self._pins)
