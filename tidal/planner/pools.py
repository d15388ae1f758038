"""The planner's pools (prefill, decode) as counted in one observation, and its books on them.

`PoolBook` owns the workers the planner acted on and has not yet seen finished (pending: the role
each is becoming, None when leaving; since when) and when each pool last grew. It counts an
observation into `Pool`s (a worker in transition counts toward the pool it is becoming and is never
picked again; `both` workers count toward the budget only) and makes the actions that move a
worker: `flip`, `add`, `remove`, each recorded in its books.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tidal.planner.types import Action, Observation, WorkerObservation
from tidal.protocol import Role

POOLS: tuple[Role, Role] = ("prefill", "decode")


@dataclass
class Pool:
    """One pool as counted in one observation."""

    role: Role
    active: list[WorkerObservation] = field(default_factory=list)  # pickable workers
    incoming: int = 0  # workers becoming this role (starting, flipping or draining into it)

    @property
    def count(self) -> int:
        return len(self.active) + self.incoming


class PoolBook:
    def __init__(self, pending_timeout_s: float) -> None:
        self.pending_timeout_s = pending_timeout_s
        self.pending: dict[str, tuple[Role | None, float]] = {}  # worker_id -> (role it becomes, since)
        self.last_grew_s: dict[Role, float] = {"prefill": -math.inf, "decode": -math.inf}

    def forget_finished(self, obs: Observation) -> None:
        """Drop pending entries whose worker left, finished its flip, or timed out."""
        seen = {w.worker_id: w for w in obs.workers}
        for worker_id, (becoming, since_s) in list(self.pending.items()):
            w = seen.get(worker_id)
            done = (w is None or (becoming is not None and w.state == "active" and w.role == becoming)
                    or obs.time_s - since_s > self.pending_timeout_s)
            if done:
                del self.pending[worker_id]

    def becoming(self, w: WorkerObservation) -> Role | None:
        """The pool a worker counts toward: its role, or the one it is becoming; None when leaving."""
        if w.worker_id in self.pending:
            return self.pending[w.worker_id][0]
        if w.state in ("active", "starting", "flipping"):
            return w.role
        return None  # draining (for removal) or stopping

    def count(self, obs: Observation) -> tuple[dict[Role, Pool], int]:
        """The pools of an observation, and its `both` workers (which count toward the budget only)."""
        pools: dict[Role, Pool] = {role: Pool(role) for role in POOLS}
        num_both = 0
        for w in obs.workers:
            becoming = self.becoming(w)
            if becoming == "both":
                num_both += 1
            elif becoming is not None:
                pickable = w.state == "active" and w.worker_id not in self.pending
                if pickable:
                    pools[becoming].active.append(w)
                else:
                    pools[becoming].incoming += 1
        return pools, num_both

    def flip(self, source: Pool, target: Pool, reason: str, time_s: float) -> Action:
        worker = least_loaded(source.active)
        source.active.remove(worker)
        target.incoming += 1
        self.pending[worker.worker_id] = (target.role, time_s)
        self.last_grew_s[target.role] = time_s
        return Action("flip", target.role, worker.worker_id, reason)

    def add(self, target: Pool, reason: str, time_s: float) -> Action:
        target.incoming += 1
        self.last_grew_s[target.role] = time_s
        return Action("add", target.role, None, reason)

    def remove(self, source: Pool, reason: str, time_s: float) -> Action:
        worker = least_loaded(source.active)
        source.active.remove(worker)
        self.pending[worker.worker_id] = (None, time_s)
        return Action("remove", source.role, worker.worker_id, reason)


def other_pool(role: Role) -> Role:
    return "decode" if role == "prefill" else "prefill"


def least_loaded(workers: list[WorkerObservation]) -> WorkerObservation:
    return min(workers, key=lambda w: (w.num_running + w.num_waiting, w.pending_prefill_tokens,
                                       w.kv_used_fraction, w.worker_id))
