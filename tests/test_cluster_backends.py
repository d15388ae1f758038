"""The distributed back ends against real servers: etcd discovery (leases, watch, restarts) and
the NATS event plane (round trip, the router's resync over it, restarts); and the factories'
embedded defaults. Servers come from `tests/_cluster.py` (skipped without the binaries, except
under CI).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Callable

import msgspec
import pytest

from tidal.protocol import (BlockRemoved, BlockStored, EngineStats, KVEventBatch, LoadReport, WorkerInfo)
from tidal.config import PlaneConfig
from tidal.router.config import RouterConfig
from tidal.router.service import Router
from tidal.router.workers import Worker
from tidal.runtime.planes import make_discovery, make_event_publisher, make_event_subscriber
from tidal.runtime.discovery import LocalDiscovery
from tidal.runtime.events import ZmqEventPublisher, ZmqEventSubscriber, cancel_and_wait

pytest_plugins = ("_cluster",)  # the etcd_server and nats_server fixtures

TTL_S = 2
_namespaces = itertools.count()


def _namespace() -> str:
    """One per test: tests share the module's servers without seeing each other's keys."""
    return f"t{next(_namespaces)}-{int(time.time() * 1000) % 100_000}"


def _worker(worker_id: str, role: str = "both") -> WorkerInfo:
    return WorkerInfo(worker_id=worker_id, role=role, request_addr=f"tcp://10.0.0.1:5{worker_id[-1]}",
                      event_addr="nats", pid=1234, host="node-a")


async def _until(predicate: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Seconds until `predicate()` holds; fails after `timeout_s`."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout_s:
            pytest.fail(f"{what}: not within {timeout_s}s")
        await asyncio.sleep(0.05)
    return time.monotonic() - start


class _Recorder:
    """Runs `discovery.watch()` in a task and keeps (kind, worker_id, role) of each event."""

    def __init__(self, discovery) -> None:
        self.events: list[tuple[str, str, str]] = []
        self.task = asyncio.create_task(self._run(discovery))

    async def _run(self, discovery) -> None:
        async for event in discovery.watch():
            self.events.append((event.kind, event.worker.worker_id, event.worker.role))

    async def close(self) -> None:
        await cancel_and_wait(self.task)


@pytest.fixture()
async def etcd_pair(etcd_server):
    """(owner, viewer): two EtcdDiscovery clients on one namespace, like a worker and a frontend."""
    cluster = PlaneConfig(etcd_endpoints=(etcd_server.url,), namespace=_namespace(), lease_ttl_s=TTL_S)
    owner, viewer = make_discovery(cluster), make_discovery(cluster)
    await owner.start()
    await viewer.start()
    yield owner, viewer
    await owner.close()
    await viewer.close()


# ---- factories ---------------------------------------------------------------------------------


def test_factories_default_to_the_embedded_back_ends():
    cluster = PlaneConfig()
    assert isinstance(make_discovery(cluster), LocalDiscovery)
    publisher = make_event_publisher(cluster, "w0", "tcp://127.0.0.1:*")
    subscriber = make_event_subscriber(cluster, ("load", "kv"))
    try:
        assert isinstance(publisher, ZmqEventPublisher) and publisher.address.startswith("tcp://127.0.0.1:")
        assert isinstance(subscriber, ZmqEventSubscriber)
    finally:
        publisher.close()
        subscriber.close()
    with pytest.raises(ValueError):
        PlaneConfig(namespace="a.b")


async def test_factories_pick_etcd_and_nats_when_configured(etcd_server, nats_server):
    from tidal.runtime.etcd_discovery import EtcdDiscovery
    from tidal.runtime.nats_events import NatsEventPublisher, NatsEventSubscriber

    cluster = PlaneConfig(etcd_endpoints=(etcd_server.url,), nats_url=nats_server.url)
    discovery = make_discovery(cluster)
    publisher = make_event_publisher(cluster, "w0", "tcp://127.0.0.1:*")
    subscriber = make_event_subscriber(cluster, ("kv",))
    try:
        assert isinstance(discovery, EtcdDiscovery)
        assert isinstance(publisher, NatsEventPublisher) and publisher.address == "nats:tidal.default.*.w0"
        assert isinstance(subscriber, NatsEventSubscriber)
    finally:
        await discovery.close()
        publisher.close()
        subscriber.close()


# ---- etcd discovery ------------------------------------------------------------------------------


async def test_etcd_register_list_watch_update_unregister(etcd_pair):
    owner, viewer = etcd_pair
    await owner.register(_worker("w0"))
    assert [w.worker_id for w in owner.list()] == ["w0"]  # the owner sees its own write at once
    await _until(lambda: viewer.list() == [_worker("w0")], 5, "viewer lists w0")
    recorder = _Recorder(viewer)  # a late watcher gets the current workers as `added`
    await owner.register(_worker("w1", "prefill"))
    await owner.update(_worker("w1", "decode"))  # a role flip
    await owner.unregister("w0", "stopped")
    expected = [("added", "w0", "both"), ("added", "w1", "prefill"), ("updated", "w1", "decode"),
                ("removed", "w0", "both")]
    await _until(lambda: recorder.events == expected, 5, f"watch events {recorder.events}")
    assert viewer.list() == owner.list() == [_worker("w1", "decode")]
    await viewer.update(_worker("w1", "prefill"))  # a flip decided elsewhere (the planner's process)
    await _until(lambda: owner.list() == [_worker("w1", "prefill")], 5, "the owner sees the flip")
    await viewer.update(_worker("w9"))  # not registered: nothing is written
    assert viewer.list() == [_worker("w1", "prefill")]
    await recorder.close()


async def test_etcd_worker_that_stops_keepalive_disappears_within_ttl(etcd_server):
    cluster = PlaneConfig(etcd_endpoints=(etcd_server.url,), namespace=_namespace(), lease_ttl_s=TTL_S)
    dying, viewer = make_discovery(cluster), make_discovery(cluster)
    await viewer.start()
    recorder = _Recorder(viewer)
    await dying.register(_worker("w0"))
    await _until(lambda: recorder.events == [("added", "w0", "both")], 5, "w0 added")
    await dying.close(revoke_lease=False)  # a crash: no revoke, no delete, just no more keepalives
    gone_s = await _until(lambda: not viewer.list(), TTL_S + 2, "w0 removed after its lease ran out")
    assert gone_s > 0.5  # it went with its lease, not with a delete
    assert recorder.events[-1] == ("removed", "w0", "both")
    await recorder.close()
    await viewer.close()


async def test_etcd_restart_keeps_workers_and_watchers(etcd_server, etcd_pair):
    owner, viewer = etcd_pair
    recorder = _Recorder(viewer)
    await owner.register(_worker("w0"))
    await _until(lambda: ("added", "w0", "both") in recorder.events, 5, "w0 added")
    await asyncio.to_thread(etcd_server.restart, TTL_S + 0.5)  # down longer than the lease's TTL
    await owner.register(_worker("w1"))  # while etcd reconnects: written by the keepalive loop if need be
    await _until(lambda: {w.worker_id for w in viewer.list()} == {"w0", "w1"}, 10,
                 "both listed after the restart")
    assert ("added", "w1", "both") in recorder.events
    assert ("removed", "w0", "both") not in recorder.events
    await recorder.close()


async def test_etcd_that_lost_its_data_gets_every_worker_again(etcd_server, etcd_pair):
    owner, viewer = etcd_pair
    await owner.register(_worker("w0"))
    await _until(lambda: viewer.list() == [_worker("w0")], 5, "w0 listed")
    recorder = _Recorder(viewer)
    await asyncio.to_thread(etcd_server.restart, 0.0, True)  # a new, empty etcd at the same address
    fresh = make_discovery(owner.planes)  # sees only what the new etcd holds
    await fresh.start()
    await _until(lambda: fresh.list() == [_worker("w0")], 10, "w0 registered again in the new etcd")
    await fresh.close()
    await owner.update(_worker("w0", "decode"))  # the viewer follows the new etcd's revisions
    flipped = ("updated", "w0", "decode")
    await _until(lambda: viewer.list() == [_worker("w0", "decode")] and recorder.events[-1] == flipped, 10,
                 f"role flip seen after the restart (events {recorder.events})")
    await recorder.close()


# ---- NATS events -------------------------------------------------------------------------------


def _stats() -> EngineStats:
    return EngineStats(num_running=1, num_waiting=2, kv_blocks_used=3, kv_blocks_total=100,
                       prefix_cache_hit_tokens=0, prompt_tokens=10, generation_tokens=5)


def _kv_batch(event_id: int, worker_id: str = "w0") -> KVEventBatch:
    return KVEventBatch(worker_id=worker_id, instance_id="i0", event_id=event_id,
                        events=[BlockStored([event_id * 10, event_id * 10 + 1], event_id), BlockRemoved([7])])


@pytest.fixture()
def nats_cluster(nats_server) -> PlaneConfig:
    return PlaneConfig(nats_url=nats_server.url, namespace=_namespace())


async def _next(subscriber, timeout_s: float = 5.0):
    stream = subscriber.events()
    try:
        return await asyncio.wait_for(anext(stream), timeout_s)
    finally:
        await stream.aclose()


async def test_nats_round_trip_of_kv_events_and_load_reports(nats_cluster):
    publisher = make_event_publisher(nats_cluster, "w0.a", "unused")  # a dot: made safe for a subject
    other = make_event_publisher(nats_cluster, "w1", "unused")
    subscriber = make_event_subscriber(nats_cluster, ("load", "kv"))
    kv_only = make_event_subscriber(nats_cluster, ("kv",))
    try:
        assert publisher.wait_connected(5) and subscriber.wait_connected(5) and kv_only.wait_connected(5)
        subscriber.connect("w0.a", publisher.address)  # not w1: its events must not arrive
        kv_only.connect("w0.a", publisher.address)
        received: list = []
        stream = subscriber.events()
        report = LoadReport(worker_id="w0.a", role="both", stats=_stats(), time=1.5)

        async def publish_until_received():
            # a subscription takes effect a moment after connect(): publish until one arrives
            while not received:
                await asyncio.to_thread(other.publish, "kv", _kv_batch(1, "w1"))
                await asyncio.to_thread(publisher.publish, "load", report)
                await asyncio.sleep(0.05)

        pumping = asyncio.create_task(publish_until_received())
        received.append(await asyncio.wait_for(anext(stream), 5))
        await cancel_and_wait(pumping)
        assert received[0] == ("load", report)
        # from a thread, as the worker's engine loop does
        batches = [_kv_batch(i, "w0.a") for i in (1, 2, 3)]
        engine_loop = threading.Thread(target=lambda: [publisher.publish("kv", batch) for batch in batches])
        engine_loop.start()
        got = []
        while len(got) < 3:
            topic, event = await asyncio.wait_for(anext(stream), 5)
            if topic == "kv":
                got.append(event)
        assert got == batches  # in order, decoded to the same values
        await stream.aclose()
        assert (await _next(kv_only))[0] == "kv"  # the load reports were filtered out by subject
    finally:
        for side in (publisher, other, subscriber, kv_only):
            side.close()


class _StubClient:
    """TEST DOUBLE of WorkerClient for the router's event handling: a role, a load report, and a
    count of dump requests; runs nothing."""

    leaving = False
    drained = False

    def __init__(self, worker_id: str) -> None:
        self.worker_id, self.role = worker_id, "both"
        self.dumps_requested = 0
        self.reported: EngineStats | None = None

    def stats(self):
        return self.reported

    def update_stats(self, stats: EngineStats) -> None:
        self.reported = stats

    def is_healthy(self) -> bool:
        return True

    def request_dump(self) -> None:
        self.dumps_requested += 1

    async def close(self) -> None:
        pass


async def test_router_over_nats_applies_kv_events_and_resyncs_on_a_gap(nats_cluster):
    subscriber = make_event_subscriber(nats_cluster, ("load", "kv"))
    router = Router(LocalDiscovery(), RouterConfig(policy="kv"), events=subscriber)
    publisher = make_event_publisher(nats_cluster, "w0", "unused")
    worker = router.workers["w0"] = Worker(_StubClient("w0"))
    router.index.add_worker("w0")
    worker.events.resyncing, worker.events.instance_id = False, "i0"  # as after a dump at event 0
    await router.start()
    try:
        assert publisher.wait_connected(5) and router.fleet.events.wait_connected(5)
        router.fleet.events.connect("w0", publisher.address)
        report = LoadReport(worker_id="w0", role="both", stats=_stats(), time=0.0)
        while worker.client.reported is None:  # until the subscription is live
            publisher.publish("load", report)
            await asyncio.sleep(0.05)
        publisher.publish("kv", _kv_batch(1))
        publisher.publish("kv", _kv_batch(2))
        await _until(lambda: router.index.blocks["w0"] == {10, 11, 20, 21}, 5, "batches 1 and 2 applied")
        publisher.publish("kv", _kv_batch(4))  # batch 3 lost on the way
        await _until(lambda: worker.client.dumps_requested == 1, 5, "a resync after the gap")
        assert router.index.blocks["w0"] == set() and worker.events.resyncing
    finally:
        publisher.close()
        await router.close()


async def test_nats_restart_publishing_resumes_and_subscribers_receive_again(nats_server, nats_cluster):
    publisher = make_event_publisher(nats_cluster, "w0", "unused")
    subscriber = make_event_subscriber(nats_cluster, ("kv",))
    event_ids = itertools.count(1)
    received: list[int] = []

    async def pump():  # the worker keeps publishing throughout, as its engine loop would
        while True:
            publisher.publish("kv", _kv_batch(next(event_ids)))
            await asyncio.sleep(0.02)

    async def collect():
        async for _topic, event in subscriber.events():
            received.append(event.event_id)

    assert publisher.wait_connected(5) and subscriber.wait_connected(5)
    subscriber.connect("w0", publisher.address)
    tasks = [asyncio.create_task(pump()), asyncio.create_task(collect())]
    try:
        await _until(lambda: received, 5, "events before the restart")
        await asyncio.to_thread(nats_server.restart, 1.0)
        published_after_restart = next(event_ids)
        await _until(lambda: received[-1] > published_after_restart, 10, "events after the restart")
    finally:
        for task in tasks:
            await cancel_and_wait(task)
        publisher.close()
        subscriber.close()
    assert received == sorted(received)  # in order; a gap is allowed (the router resyncs on it)


def test_worker_info_survives_the_etcd_encoding():
    worker = _worker("w3", "prefill")
    assert msgspec.json.decode(msgspec.json.encode(worker), type=WorkerInfo) == worker
