"""A TEST DOUBLE of `EngineClient` whose `admit` makes the real router's decision.

`RoutedEngine` is `test_frontend_unit.ScriptedEngine` (scripted tokens, no model) plus a real
`Router` over two stub workers with the kv policy: every admitted request is planned by
`Router.dispatcher.plan` (session pins, the request's `routing` weights, the kv policy's sampling)
and the plan released, so what a request body can make the routing code do is exercised in-process.
"""

from __future__ import annotations

from test_frontend_unit import ScriptedEngine

from tidal.protocol import AddRequest, EngineStats
from tidal.router.config import RouterConfig
from tidal.router.service import Router
from tidal.router.workers import Worker
from tidal.runtime.discovery import LocalDiscovery


class StubWorkerClient:
    """TEST DOUBLE of WorkerClient for routing decisions only: a role, health and a load report."""

    leaving = False
    drained = False
    ready = None

    def __init__(self, worker_id: str) -> None:
        self.worker_id, self.role = worker_id, "both"

    def stats(self) -> EngineStats:
        return EngineStats(num_running=0, num_waiting=0, kv_blocks_used=0, kv_blocks_total=1000,
                           prefix_cache_hit_tokens=0, prompt_tokens=0, generation_tokens=0)

    def is_healthy(self) -> bool:
        return True

    def request_dump(self) -> None:
        pass


class RoutedEngine(ScriptedEngine):
    """Scripted tokens after a real kv routing decision (`close()` when done)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.router = Router(LocalDiscovery(), RouterConfig(policy="kv"))
        for i in range(2):
            worker = self.router.workers[f"w{i}"] = Worker(StubWorkerClient(f"w{i}"))
            self.router.index.add_worker(worker.worker_id)

    async def admit(self, request: AddRequest) -> None:
        self.router.dispatcher.plan(request).release()

    def close(self) -> None:
        self.router.fleet.events.close()  # its ZMQ context would block garbage collection otherwise
