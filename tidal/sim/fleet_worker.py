"""What the fleet simulator knows of one request (`SimRequest`) and one worker (`SimWorker`): plain
state, changed by `tidal.sim.fleet_steps` (a worker's steps), `tidal.sim.fleet_routing` (the router)
and `tidal.sim.fleet.Fleet` (lifecycle).

A worker's lifecycle: `starting` (for `startup_s`) -> `active` -> `draining` (no new work, leaves
once empty: state `stopping`) or `flipping` (drains, waits `flip_s`, comes back `active` in its new
role without a restart).
"""

from __future__ import annotations

from collections import deque

from tidal.planner.types import Role


class SimRequest:
    __slots__ = ("request_id", "arrival_s", "input_len", "output_len", "cached_tokens", "first_token_s",
                 "finish_s", "join_clock", "local_prefill", "worker_id", "kv_tokens")

    def __init__(self, request_id: int, arrival_s: float, input_len: int, output_len: int, cached_tokens: int = 0):
        self.request_id = request_id
        self.arrival_s = arrival_s
        self.input_len = input_len
        self.output_len = max(output_len, 1)
        self.cached_tokens = min(cached_tokens, input_len - 1) if input_len > 1 else 0
        self.first_token_s: float | None = None
        self.finish_s: float | None = None
        self.join_clock = 0.0
        self.local_prefill = False
        self.worker_id = ""  # its decode worker, once routed
        self.kv_tokens = input_len + self.output_len

    @property
    def uncached_tokens(self) -> int:
        return self.input_len - self.cached_tokens


class WorkerStats:
    """One worker's figures over the current observation interval."""
    __slots__ = ("steps", "busy_s", "prefill_tokens", "decode_tokens", "batch_steps", "context_steps")

    def __init__(self) -> None:
        self.steps = self.busy_s = 0.0
        self.prefill_tokens = 0
        self.decode_tokens = self.batch_steps = self.context_steps = 0.0


class SimWorker:
    __slots__ = ("worker_id", "role", "state", "added_s", "left_s", "next_role", "switching", "stats",
                 "queue", "pending_tokens", "prefill_busy",
                 "clock", "t_last", "step_s", "batch", "ctx_base", "kv_used", "waiting", "version")

    def __init__(self, worker_id: str, role: Role, added_s: float, state: str = "starting"):
        self.worker_id = worker_id
        self.role = role
        self.state = state
        self.added_s = added_s
        self.left_s: float | None = None
        self.next_role: Role | None = None
        self.switching = False  # flipping: drained, the role switch under way
        self.stats = WorkerStats()
        # prefill: FIFO of requests, whether a step is running; pending_tokens: prompt tokens here
        # without a first token yet (a prefill worker's queue and step, a decode worker's local prompts)
        self.queue: deque[SimRequest] = deque()
        self.pending_tokens = 0
        self.prefill_busy = False
        # decode: a token clock (tokens each running sequence gained), when it was last advanced (may lie
        # in the future during a local-prefill stall), the step time of the current span, the batch as a
        # heap of (finish clock, request id, request), sum over the batch of (context at join - join clock)
        self.clock = 0.0
        self.t_last = added_s
        self.step_s = 0.0
        self.batch: list[tuple[float, int, SimRequest]] = []
        self.ctx_base = 0.0
        self.kv_used = 0
        self.waiting: deque[SimRequest] = deque()
        self.version = 0

    @property
    def is_empty(self) -> bool:
        return not (self.queue or self.prefill_busy or self.batch or self.waiting)

    def context_sum(self) -> float:
        return self.ctx_base + len(self.batch) * self.clock
