"""Drain, undrain and role flips of the router's workers: what the planner's actuators drive
(`tidal.planner.actuators.FleetControl`, which the `Router` satisfies through this).

`drain(worker_id)` takes a worker out of routing (as decode and as prefill target) for every
router replica (`SetDraining`: the worker tells all its clients), waits until no admitted request
uses it (a prefill worker counts until the decode side has its KV) and the worker itself confirms
it holds nothing (it accepts `SetRole` of its own role only when idle); `undrain` puts it back;
`set_role` flips a drained worker, with the new role's scheduler limits. A drain that times out
leaves the worker drained: the caller undrains or removes it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from tidal.config import DRAIN_TIMEOUT_S, WORKER_READY_TIMEOUT_S
from tidal.errors import RoleChangeError
from tidal.protocol import Role
from tidal.router.workers import WorkerSet

logger = logging.getLogger(__name__)

DRAIN_POLL_S = 0.01


class RoleControl:
    def __init__(self, fleet: WorkerSet, on_change: Callable[[], None]) -> None:
        self.fleet = fleet
        self.on_change = on_change  # queued requests may route elsewhere now

    async def wait_worker(self, worker_id: str, timeout_s: float = WORKER_READY_TIMEOUT_S) -> None:
        """Until a newly registered worker is connected and routable."""
        deadline = time.monotonic() + timeout_s
        while worker_id not in self.fleet.workers:
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker {worker_id} did not become ready in {timeout_s:g}s")
            listed = {w.worker_id for w in self.fleet.discovery.list()}
            if worker_id not in self.fleet.starting and worker_id not in listed:
                raise RuntimeError(f"worker {worker_id} went away before it was ready")
            await asyncio.sleep(DRAIN_POLL_S)

    async def drain(self, worker_id: str, timeout_s: float = DRAIN_TIMEOUT_S) -> float:
        """Route nothing new to the worker and wait until it has finished everything it has:
        its admitted requests, KV it holds for a decode worker, KV it is pulling. Returns the
        seconds it took."""
        worker = self.fleet.workers.get(worker_id)
        if worker is None:
            raise KeyError(f"no worker {worker_id}")
        started = time.monotonic()
        deadline = started + timeout_s
        worker.draining = True
        worker.client.set_draining(True)  # every router replica stops sending it work
        self.on_change()
        while worker.inflight > 0:
            if not worker.client.is_healthy():
                raise RuntimeError(f"worker {worker_id} died while draining")
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker {worker_id} still has {worker.inflight} requests after {timeout_s:g}s")
            await asyncio.sleep(DRAIN_POLL_S)
        # The router's count is zero; held KV is freed by the decode worker's ReleaseKV, which the
        # router does not see. The worker accepts SetRole (of its own role) only once it holds nothing.
        while True:
            try:
                await worker.client.set_role(worker.client.role)
                return time.monotonic() - started
            except RoleChangeError:
                if time.monotonic() > deadline or not worker.client.is_healthy():
                    raise
                await asyncio.sleep(DRAIN_POLL_S)

    def undrain(self, worker_id: str) -> None:
        worker = self.fleet.workers.get(worker_id)
        if worker is not None and not worker.client.leaving:
            worker.draining = False
            worker.client.set_draining(False)
            self.on_change()

    def is_draining(self, worker_id: str) -> bool:
        worker = self.fleet.workers.get(worker_id)
        return worker is not None and worker.draining

    async def set_role(self, worker_id: str, role: Role, token_budget: int | None = None,
                       max_num_seqs: int | None = None) -> None:
        """Flip a drained worker's role, with the new role's scheduler limits (raises RoleChangeError
        if it refuses). Its prefix cache stays valid: the index keeps its blocks."""
        await self.fleet.workers[worker_id].client.set_role(role, token_budget=token_budget,
                                                            max_num_seqs=max_num_seqs)
        logger.info("worker %s is now %s", worker_id, role)

    def role_of(self, worker_id: str) -> Role | None:
        """The role of a worker this router is connected to; None for any other."""
        worker = self.fleet.workers.get(worker_id)
        return worker.client.role if worker is not None else None
