"""The serving tier's parts, in one process: the discovery relay, the replica bus, the defaults."""

from __future__ import annotations

import asyncio
import time

import pytest

from tidal.deploy.api_servers import default_api_servers
from tidal.deploy.config import DeploymentError, parse_deployment
from tidal.protocol import WorkerInfo
from tidal.router.replicas import ReplicaBus, ReplicaBusProxy, RequestLogFeed
from tidal.router.request_log import RequestLog
from tidal.runtime.discovery import LocalDiscovery
from tidal.runtime.discovery_relay import DiscoveryRelay, RelayDiscovery


def _worker(worker_id: str, role: str = "both") -> WorkerInfo:
    return WorkerInfo(worker_id=worker_id, role=role, request_addr=f"ipc:///tmp/{worker_id}.req",
                      event_addr=f"ipc:///tmp/{worker_id}.ev")


async def _next(events, timeout_s: float = 5.0):
    return await asyncio.wait_for(events.__anext__(), timeout_s)


async def test_relay_gives_a_snapshot_then_every_change(tmp_path):
    local = LocalDiscovery()
    await local.register(_worker("a"))
    relay = DiscoveryRelay(local, f"ipc://{tmp_path}/relay")
    await relay.start()
    follower = RelayDiscovery(relay.address, "api0.1/")
    try:
        await follower.start()
        assert [w.worker_id for w in follower.list()] == ["a"]
        events = follower.watch()
        first = await _next(events)
        assert (first.kind, first.worker.worker_id) == ("added", "a")
        await local.register(_worker("b", "decode"))
        added = await _next(events)
        assert (added.kind, added.worker.worker_id, added.worker.role) == ("added", "b", "decode")
        await local.update(_worker("b", "prefill"))
        updated = await _next(events)
        assert (updated.kind, updated.worker.role) == ("updated", "prefill")
        await local.unregister("a", "exited with code 1")
        removed = await _next(events)
        assert (removed.kind, removed.worker.worker_id, removed.reason) == ("removed", "a", "exited with code 1")
        assert [w.worker_id for w in follower.list()] == ["b"]
        with pytest.raises(NotImplementedError):
            await follower.register(_worker("c"))
    finally:
        await follower.close()
        await relay.close()


class _Router:
    """TEST DOUBLE of Router for the bus: a session table and a request log."""

    def __init__(self) -> None:
        self.sessions: dict[str, str] = {}
        self.request_log = RequestLog()
        self.queue_length = 0
        self.on_session_pinned = None

    def pin_session(self, session_id: str, worker_id: str) -> None:
        self.sessions[session_id] = worker_id


async def _until(condition, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.02)


async def test_replica_bus_shares_session_pins_and_request_logs(tmp_path):
    proxy = ReplicaBusProxy(f"ipc://{tmp_path}/in", f"ipc://{tmp_path}/out")
    first, second = _Router(), _Router()
    buses = [ReplicaBus(router, proxy.in_address, proxy.out_address, f"api{i}/")
             for i, router in enumerate((first, second))]
    planner_log = RequestLog()
    feed = RequestLogFeed(planner_log, proxy.out_address)
    try:
        for bus in buses:
            await bus.start()
        await feed.start()
        await asyncio.sleep(0.3)  # PUB/SUB connections settle
        first.on_session_pinned("chat-1", "decode-0")
        await _until(lambda: second.sessions.get("chat-1") == "decode-0")
        # Two replicas' logs interleave in time; the merged log stays in time order.
        base = time.monotonic()  # the buses send what finished after they started
        for router, times in ((first, (1.0, 3.0)), (second, (2.0, 4.0))):
            for t in (base + t for t in times):
                router.request_log.arrived()
                router.request_log.finish(t - 0.5, t - 0.4, t, prompt_tokens=10, cached_tokens=2, output_tokens=5)
        second.queue_length = 3
        buses[0].flush_log()
        await _until(lambda: len(planner_log.finished) == 2)
        buses[1].flush_log()
        await _until(lambda: len(planner_log.finished) == 4)
        assert [f.finished_at - base for f in planner_log.finished] == [1.0, 2.0, 3.0, 4.0]
        assert [f.finished_at - base for f in planner_log.since(base + 2.5)] == [3.0, 4.0]
        assert planner_log.arrivals_total == 4
        assert feed.queue_depth == 3
    finally:
        await feed.close()
        for bus in buses:
            await bus.close()
        proxy.close()


def test_default_api_servers_follow_the_core_count():
    assert [default_api_servers(n) for n in (1, 2, 4, 8, 16, 32, 128)] == [1, 1, 1, 2, 4, 8, 8]


def test_api_servers_config_is_checked():
    workers = [{"role": "both"}]
    assert parse_deployment({"frontend": {"api_servers": 3}, "workers": workers}).frontend.api_servers == 3
    with pytest.raises(DeploymentError, match="frontend.api_servers"):
        parse_deployment({"frontend": {"api_servers": 0}, "workers": workers})
