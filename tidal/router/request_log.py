"""A small rolling record of requests as the router sees them, for the planner's observations.

Owns a bounded deque of finished requests (`tidal.fleet_snapshot.FinishedRequest`: first-token
latency, mean inter-token latency, prompt, cached and output lengths) and a count of arrivals. The
router appends as requests arrive and finish and publishes it in its `FleetSnapshot`; the replica
bus reads what finished since its last look (`since`). Bounded: at most
`max_finished` entries are kept, the oldest dropped first, so a slow reader loses the oldest only.
Times are `time.monotonic()` seconds.
"""

from __future__ import annotations

from collections import deque

from tidal.fleet_snapshot import FinishedRequest, finished_since

MAX_FINISHED = 4096


class RequestLog:
    def __init__(self, max_finished: int = MAX_FINISHED) -> None:
        self.finished: deque[FinishedRequest] = deque(maxlen=max_finished)
        self.arrivals_total = 0

    def arrived(self) -> None:
        self.arrivals_total += 1

    def finish(self, arrived_at: float, first_token_at: float | None, last_token_at: float, prompt_tokens: int,
               cached_tokens: int, output_tokens: int) -> None:
        if first_token_at is None:
            return
        itl_s = (last_token_at - first_token_at) / (output_tokens - 1) if output_tokens > 1 else None
        self.finished.append(FinishedRequest(last_token_at, first_token_at - arrived_at, itl_s, prompt_tokens,
                                             cached_tokens, output_tokens))

    def since(self, t: float) -> list[FinishedRequest]:
        """Requests that finished after `t`, oldest first."""
        return finished_since(self.finished, t)
