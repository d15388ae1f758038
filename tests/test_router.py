"""The router's pure parts (policy arithmetic, KV index, event ordering and resync) and its
admission and session logic, driven without worker processes.

`_StubClient` below is a TEST DOUBLE of `WorkerClient` for the routing decisions only: it has a
role, health and a load report, and records dump requests; it runs nothing.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from tidal.errors import OverloadedError
from tidal.hashing import block_hashes
from tidal.protocol import (AddRequest, AllBlocksCleared, BlockRemoved, BlockStored, EngineStats, KVDump,
                            KVEventBatch, RoutingHints, SamplingParams)
from tidal.router.config import RouterConfig
from tidal.router.index import KVIndex, WorkerEvents
from tidal.router.policy import (DisaggPolicy, KVWeights, WorkerView, choose_prefill_worker, choose_worker,
                                 decide_prefill, kv_cost, session_worker)
from tidal.router.service import Router
from tidal.router.workers import Worker
from tidal.runtime.discovery import LocalDiscovery


def _views(*loads):
    """(open requests, pending prefill tokens, overlap blocks, active blocks) per worker."""
    return [WorkerView(f"w{i}", "decode", open_requests=o, pending_prefill_tokens=p, overlap_blocks=b,
                       active_blocks=a) for i, (o, p, b, a) in enumerate(loads)]


# ---- policy ------------------------------------------------------------------------------------


def test_kv_cost_arithmetic():
    a, b = _views((0, 128, 60, 200), (0, 0, 0, 150))
    # A: 1 x (128 pending + (1024 - 60 x 16) uncached) / 16 + 200 active = 1 x 192 / 16 + 200 = 212
    assert kv_cost(a, 1024, 16, 1.0) == 212
    # B: 1 x (0 + 1024) / 16 + 150 = 64 + 150 = 214
    assert kv_cost(b, 1024, 16, 1.0) == 214
    assert choose_worker([a, b], "kv", 1024, 16, 0, random.Random(0)).worker_id == "w0"
    # weight 2 doubles the prefill part: A 2 x 12 + 200 = 224, B 2 x 64 + 150 = 278: A still
    assert kv_cost(a, 1024, 16, 2.0) == 224 and kv_cost(b, 1024, 16, 2.0) == 278
    # weight 0 leaves decode load alone: A 200, B 150: B
    assert choose_worker([a, b], "kv", 1024, 16, 0, random.Random(0), KVWeights(overlap_weight=0)).worker_id == "w1"


def test_kv_ties_go_to_fewer_open_requests_then_at_random():
    views = _views((3, 0, 0, 10), (1, 0, 0, 10), (1, 0, 0, 10))
    picks = {choose_worker(views, "kv", 64, 16, 0, random.Random(seed)).worker_id for seed in range(20)}
    assert picks == {"w1", "w2"}


def test_kv_temperature_samples_cheaper_workers_more_often():
    views = _views((0, 0, 0, 10), (0, 0, 0, 100))  # costs 14 and 104 for a 64-token prompt
    rng = random.Random(0)
    picks = [choose_worker(views, "kv", 64, 16, 0, rng, KVWeights(temperature=0.5)).worker_id for _ in range(400)]
    # softmax(-[14/104, 104/104] / 0.5): p(w0) = 1 / (1 + e^(-(1 - 0.135) / 0.5)) = 0.85
    assert 0.78 < picks.count("w0") / 400 < 0.92


def test_round_robin_random_least_loaded():
    rng = random.Random(0)
    views = _views((0, 0, 0, 0), (0, 0, 0, 0), (0, 0, 0, 0))
    assert [choose_worker(views, "round_robin", 10, 16, i, rng).worker_id for i in range(4)] == ["w0", "w1", "w2", "w0"]
    assert {choose_worker(views, "random", 10, 16, 0, rng).worker_id for _ in range(50)} == {"w0", "w1", "w2"}
    views = _views((3, 0, 0, 0), (1, 0, 0, 5), (1, 0, 0, 2))
    assert choose_worker(views, "least_loaded", 10, 16, 0, rng).worker_id == "w2"


def test_prefill_choice_credits_overlap_and_conditional_disaggregation():
    rng = random.Random(0)
    prefill = _views((0, 4000, 0, 0), (0, 1000, 0, 0))
    assert choose_prefill_worker(prefill, 2048, 16, rng).worker_id == "w1"  # 4000 + 2048 vs 1000 + 2048
    prefill = _views((0, 1000, 128, 0), (0, 0, 0, 0))
    assert choose_prefill_worker(prefill, 2048, 16, rng).worker_id == "w0"  # 1000 + 0 vs 0 + 2048
    policy = DisaggPolicy(local_prefill_threshold=512, max_prefill_queue_tokens=8000)
    assert decide_prefill(511, prefill, policy) == "local"
    assert decide_prefill(512, prefill, policy) == "remote"
    assert decide_prefill(4096, [], policy) == "local"
    assert decide_prefill(4096, _views((0, 8000, 0, 0), (0, 9000, 0, 0)), policy) == "local"


def test_session_affinity_keeps_the_pinned_worker_unless_gone_or_full():
    views = _views((0, 100, 0, 0), (0, 5000, 0, 0))
    assert session_worker(views, "w1", max_pending_prefill_tokens=8000).worker_id == "w1"
    assert session_worker(views, "w1", max_pending_prefill_tokens=5000) is None  # full: 5000 pending
    assert session_worker(views, "w7", max_pending_prefill_tokens=8000) is None  # gone (or draining)
    assert session_worker(views, None, max_pending_prefill_tokens=8000) is None  # no pin yet


# ---- index -------------------------------------------------------------------------------------


def test_overlaps_equal_a_brute_force_walk():
    rng = random.Random(1)
    index = KVIndex()
    prompts = [[rng.randrange(50) for _ in range(rng.randrange(16, 160))] for _ in range(20)]
    held: dict[str, set[int]] = {f"w{i}": set() for i in range(6)}
    for worker_id in held:
        for prompt in rng.sample(prompts, 6):
            hashes = block_hashes(prompt, 16)[:rng.randrange(0, 11)]
            index.store(worker_id, hashes)
            held[worker_id].update(hashes)
    for prompt in prompts:
        hashes = block_hashes(prompt, 16)
        want = {}
        for worker_id, blocks in held.items():
            n = next((i for i, h in enumerate(hashes) if h not in blocks), len(hashes))
            if n:
                want[worker_id] = n
        assert index.overlaps(hashes) == want


class _SimWorker:
    """Ground truth: one worker's cached hashes and the event batches it publishes."""

    def __init__(self, worker_id: str, instance_id: str = "a") -> None:
        self.worker_id, self.instance_id = worker_id, instance_id
        self.blocks: set[int] = set()
        self.event_id = 0

    def random_batch(self, rng: random.Random) -> KVEventBatch:
        events = []
        for _ in range(rng.randrange(1, 4)):
            roll = rng.random()
            if roll < 0.6:
                new = [rng.randrange(1, 400) for _ in range(rng.randrange(1, 5))]
                self.blocks.update(new)
                events.append(BlockStored(new, 0))
            elif roll < 0.95 and self.blocks:
                gone = rng.sample(sorted(self.blocks), min(len(self.blocks), rng.randrange(1, 4)))
                self.blocks.difference_update(gone)
                events.append(BlockRemoved(gone))
            else:
                self.blocks.clear()
                events.append(AllBlocksCleared())
        self.event_id += 1
        return KVEventBatch(worker_id=self.worker_id, instance_id=self.instance_id, event_id=self.event_id,
                            events=events)

    def dump(self) -> KVDump:
        return KVDump(worker_id=self.worker_id, instance_id=self.instance_id, event_id=self.event_id,
                      blocks=[(h, 0) for h in self.blocks])


@pytest.mark.parametrize("seed", range(5))
def test_index_equals_ground_truth_after_dropped_events_and_resyncs(seed):
    """Random event streams with dropped batches and a worker restart. A drop shows only when a
    later batch arrives (a gap); from then on the worker resyncs. Whenever no resync is pending and
    no drop is still unseen, the index holds exactly each worker's blocks."""
    rng = random.Random(seed)
    workers = {f"w{i}": _SimWorker(f"w{i}") for i in range(3)}
    index, states = KVIndex(), {w: WorkerEvents() for w in workers}
    dumps_asked: set[str] = set(workers)  # a new worker starts with a dump
    unseen_drop: set[str] = set()
    resyncs = 0

    def answer_dumps():
        for worker_id in list(dumps_asked):
            if rng.random() < 0.5:
                continue  # the answer is still on its way
            dumps_asked.discard(worker_id)
            unseen_drop.discard(worker_id)  # the dump is the state after every batch, dropped or not
            later = states[worker_id].finish_resync(workers[worker_id].dump())
            index.clear_worker(worker_id)
            if later is None:
                ask(worker_id)
                continue
            index.store(worker_id, (h for h, _ in workers[worker_id].dump().blocks))
            for batch in later:
                index.apply(worker_id, batch.events)

    def ask(worker_id):
        nonlocal resyncs
        states[worker_id].start_resync()
        index.clear_worker(worker_id)
        dumps_asked.add(worker_id)
        resyncs += 1

    for step in range(400):
        worker = workers[rng.choice(sorted(workers))]
        if step == 200:  # a restart: new instance, ids from 1 again, empty cache
            worker = workers["w1"] = _SimWorker("w1", instance_id="b")
        batch = worker.random_batch(rng)
        if rng.random() < 0.1:
            unseen_drop.add(worker.worker_id)  # dropped in transit
            continue
        state = states[worker.worker_id]
        if state.accept(batch):
            index.apply(worker.worker_id, batch.events)
        elif state.resyncing and worker.worker_id not in dumps_asked:
            ask(worker.worker_id)
        answer_dumps()
        for worker_id, sim in workers.items():
            if not states[worker_id].resyncing and worker_id not in unseen_drop:
                assert index.blocks.get(worker_id, set()) == sim.blocks, (step, worker_id)
    assert resyncs > 3


# ---- router decisions (stub workers) -------------------------------------------------------------


class _StubClient:
    """TEST DOUBLE of WorkerClient: a role, health and a load report; runs nothing."""

    leaving = False
    drained = False
    ready = None  # no WorkerReady: block size unknown

    def __init__(self, worker_id: str, role: str = "both") -> None:
        self.worker_id, self.role = worker_id, role
        self.dumps_requested = 0

    def stats(self):
        return EngineStats(num_running=0, num_waiting=0, kv_blocks_used=0, kv_blocks_total=1000,
                           prefix_cache_hit_tokens=0, prompt_tokens=0, generation_tokens=0)

    def is_healthy(self) -> bool:
        return True

    def request_dump(self) -> None:
        self.dumps_requested += 1


@pytest.fixture()
def make_router():
    made: list[Router] = []

    def make(policy: str = "kv", **config) -> Router:
        router = Router(LocalDiscovery(), RouterConfig(policy=policy, **config))
        for i in range(2):
            worker = router.workers[f"w{i}"] = Worker(_StubClient(f"w{i}"))
            router.index.add_worker(worker.worker_id)
        made.append(router)
        return router

    yield make
    for router in made:
        router.fleet.events.close()  # its ZMQ context would block garbage collection otherwise


def _request(request_id: str, prompt: list[int], session: str | None = None, priority: int = 0) -> AddRequest:
    return AddRequest(request_id=request_id, prompt_token_ids=prompt, sampling_params=SamplingParams(max_tokens=4),
                      routing=RoutingHints(session_id=session, priority=priority))


def test_kv_policy_follows_the_index_and_sessions_stick(make_router):
    router = make_router()
    prompt = list(range(200))
    router.index.store("w1", block_hashes(prompt, 16))
    plan = router.dispatcher.plan(_request("a", prompt))
    assert plan.decode.worker_id == "w1" and plan.uncached == 200 - 12 * 16
    plan.release()
    # a session stays where it started, even against the index, unless that worker is full
    first = router.dispatcher.plan(_request("s1", list(range(500, 600)), session="chat-1"))
    stuck = router.dispatcher.plan(_request("s2", prompt, session="chat-1"))
    assert stuck.decode is first.decode
    first.decode.pending_prefill_tokens += router.config.max_pending_prefill_tokens
    moved = router.dispatcher.plan(_request("s3", prompt, session="chat-1"))
    assert moved.decode is not first.decode


def test_bookkeeping_spreads_a_burst_between_reports(make_router):
    router = make_router()
    plans = [router.dispatcher.plan(_request(f"r{i}", [i + 1000] * 64)) for i in range(10)]
    assert sorted(sum(1 for p in plans if p.decode.worker_id == w) for w in ("w0", "w1")) == [5, 5]
    for plan in plans:
        plan.release()
    assert all(w.open_requests == 0 and w.pending_prefill_tokens == 0 and w.active_blocks == 0
               for w in router.workers.values())


def test_snapshot_publishes_workers_bookkeeping_and_the_request_log(make_router):
    router = make_router()
    plan = router.dispatcher.plan(_request("a", list(range(100))))
    router.request_log.arrived()
    router.request_log.finish(1.0, 1.5, 2.0, prompt_tokens=100, cached_tokens=0, output_tokens=3)
    fleet = router.snapshot()
    by_id = {w.worker_id: w for w in fleet.workers}
    assert set(by_id) == {"w0", "w1"} and all(w.connected and not w.draining for w in fleet.workers)
    assert by_id[plan.decode.worker_id].pending_prefill_tokens == 100
    assert fleet.arrivals_total == 1 and fleet.queue_depth == 0
    assert [f.ttft_s for f in fleet.finished_since(0.0)] == [0.5] and fleet.finished_since(2.0) == []
    plan.release()
    assert {w.pending_prefill_tokens for w in router.snapshot().workers} == {0}


def test_gap_in_events_triggers_a_resync(make_router):
    router = make_router()
    worker = router.workers["w0"]
    worker.events.resyncing = False
    worker.events.instance_id = "i"
    router.fleet.on_kv_events(worker, KVEventBatch(worker_id="w0", instance_id="i", event_id=1, events=[BlockStored([5], 0)]))
    assert router.index.blocks["w0"] == {5}
    router.fleet.on_kv_events(worker, KVEventBatch(worker_id="w0", instance_id="i", event_id=3, events=[BlockStored([6], 5)]))
    assert worker.client.dumps_requested == 1 and router.index.blocks["w0"] == set()
    router.fleet.on_dump(KVDump(worker_id="w0", instance_id="i", event_id=2, blocks=[(5, 0), (9, 5)]))
    assert router.index.blocks["w0"] == {5, 9, 6}  # the dump, then the buffered batch 3
    assert router.metrics.resyncs._value.get() == 1


def test_admission_queues_by_priority_then_refuses(make_router):
    async def scenario():
        router = make_router(max_pending_prefill_tokens=100, max_queue=2, queue_timeout_s=0.3)
        await router.admit(_request("a", [1] * 150))  # w0 full
        await router.admit(_request("b", [2] * 150))  # w1 full
        low = asyncio.create_task(router.admit(_request("low", [3] * 150, priority=0)))
        high = asyncio.create_task(router.admit(_request("high", [4] * 150, priority=5)))
        await asyncio.sleep(0.01)
        assert router.metrics.queue_depth._value.get() == 2
        with pytest.raises(OverloadedError):  # the queue is full
            await router.admit(_request("c", [5] * 10))
        router.admission.plans["a"].first_token()  # w0 has room again: the higher priority takes it (and fills it)
        router.admission.wake()
        await asyncio.sleep(0.01)
        assert high.done() and not low.done()
        with pytest.raises(OverloadedError):  # waited past the timeout
            await low
        assert router.metrics.rejected.labels("queue_full")._value.get() == 1
        assert router.metrics.rejected.labels("queue_timeout")._value.get() == 1
        assert router.metrics.queue_depth._value.get() == 0

    asyncio.run(scenario())
