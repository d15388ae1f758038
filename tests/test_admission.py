"""Admission that sheds load: the wait estimate's parts, each refusal, and a burst far over capacity
through a real server (`tidal sim`) that gets 503s with Retry-After within the deadline, then recovers.

`_Client` below is a TEST DOUBLE of `WorkerClient` for admission only: a role, health and a load
report the test sets; it runs nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import httpx
import pytest

from _server import metrics, running_server
from tidal.deploy.config import DeploymentError, parse_deployment
from tidal.errors import OverloadedError
from tidal.fleet_snapshot import FinishedRequest
from tidal.protocol import AddRequest, EngineStats, SamplingParams, TokenDelta
from tidal.router.admission import first_delta
from tidal.router.config import RouterConfig
from tidal.router.service import Router
from tidal.router.wait_estimate import DecodeRate, WorkerQueue, estimate_wait_s, output_tokens_per_request
from tidal.router.workers import Worker
from tidal.runtime.discovery import LocalDiscovery


def _stats(waiting: int = 0, generated: int = 0) -> EngineStats:
    return EngineStats(num_running=4, num_waiting=waiting, kv_blocks_used=0, kv_blocks_total=1000,
                       prefix_cache_hit_tokens=0, prompt_tokens=0, generation_tokens=generated)


class _Client:
    """TEST DOUBLE of WorkerClient: a role, health and the load report the test sets."""

    leaving = False
    drained = False
    ready = None
    role = "both"

    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id
        self.report = _stats()

    def stats(self) -> EngineStats:
        return self.report

    def is_healthy(self) -> bool:
        return True


def _request(request_id: str, max_tokens: int = 100) -> AddRequest:
    return AddRequest(request_id=request_id, prompt_token_ids=[1] * 20,
                      sampling_params=SamplingParams(max_tokens=max_tokens))


@pytest.fixture()
def router():
    router = Router(LocalDiscovery(), RouterConfig(queue_timeout_s=10.0, max_waiting_per_worker=50))
    for i in range(2):
        router.workers[f"w{i}"] = Worker(_Client(f"w{i}"))
        router.index.add_worker(f"w{i}")
    yield router
    router.fleet.events.close()


def _saturate(worker: Worker, waiting: int, tokens_per_s: float) -> None:
    """Two load reports a second apart with `waiting` queued: the worker's decode rate is measured."""
    worker.client.report = _stats(waiting, 0)
    worker.decode_rate.observe(worker.client.report, 0.0)
    worker.client.report = _stats(waiting, int(tokens_per_s))
    worker.decode_rate.observe(worker.client.report, 1.0)


# ---- the estimate's parts ------------------------------------------------------------------------

def test_decode_rate_counts_only_intervals_with_a_queue():
    rate = DecodeRate()
    rate.observe(_stats(0, 0), 0.0)
    rate.observe(_stats(0, 500), 1.0)  # no queue: an idle worker says nothing about draining one
    rate.observe(_stats(3, 900), 2.0)  # a queue only at the end
    assert rate.tokens_per_s is None
    rate.observe(_stats(3, 1000), 3.0)
    assert rate.tokens_per_s == pytest.approx(100.0)
    rate.observe(_stats(3, 1000), 4.0)  # nothing produced (a prefill step): no sample
    rate.observe(_stats(3, 1200), 5.0)  # 200 tok/s over 1 s moves the EWMA part of the way
    assert 100.0 < rate.tokens_per_s < 200.0
    rate.observe(_stats(0, 1300), 60.0)  # idle again: the last saturated rate stays
    assert 100.0 < rate.tokens_per_s < 200.0


def test_output_length_and_wait_estimate():
    finished = [FinishedRequest(float(i), 0.1, 0.01, 10, 0, n) for i, n in enumerate([1000, 10, 30])]
    assert output_tokens_per_request([], fallback=256) == 256.0  # nothing finished: the request's max_tokens
    assert output_tokens_per_request(finished, fallback=256) == pytest.approx(1040 / 3)
    # 10 queued at 100 tok/s, 50 tokens a request: a slot frees every 0.5 s -> 5 s; the other worker 0.5 s
    queues = [WorkerQueue(10, 100.0), WorkerQueue(1, 100.0)]
    assert estimate_wait_s(0, queues, 50.0) == pytest.approx(0.5)
    # 4 more in the router drain at the fleet's 200 tok/s first: +1 s
    assert estimate_wait_s(4, queues, 50.0) == pytest.approx(1.5)
    # a worker without a queue, or whose rate is not measured yet, counts as no wait
    assert estimate_wait_s(0, [WorkerQueue(10, 100.0), WorkerQueue(0, None)], 50.0) == 0.0
    assert estimate_wait_s(0, [WorkerQueue(10, None)], 50.0) == 0.0
    assert estimate_wait_s(3, [], 50.0) == 0.0


def test_worker_queue_counts_what_was_sent_since_its_report():
    worker = Worker(_Client("w"))
    worker.sent(20)
    assert worker.waiting == 0  # its report shows free slots: the request starts at once
    worker.client.report = _stats(waiting=5)
    worker.sent(20)
    worker.sent(20)
    assert worker.waiting == 5 + 2  # the report's queue plus what came after it
    worker.first_token(20)
    worker.first_token(20)
    worker.first_token(20)
    assert worker.waiting == 5 and worker.pending_requests == 0 and worker.pending_prefill_tokens == 0
    worker.client.report = _stats(waiting=6)  # a new report counts everything sent before it
    assert worker.waiting == 6


# ---- refusals ------------------------------------------------------------------------------------

def test_normal_load_is_admitted_and_an_unmeasured_queue_never_sheds(router):
    async def scenario():
        for w in router.workers.values():
            w.client.report = _stats(waiting=10)  # a queue, but no rate measured yet
        for i in range(5):
            await router.admit(_request(f"r{i}"))
        assert len(router.admission.plans) == 5

    asyncio.run(scenario())


def test_every_worker_queue_full_is_refused_with_retry_after(router):
    async def scenario():
        router.workers["w0"].client.report = _stats(waiting=50)
        await router.admit(_request("one_worker_full"))  # the other one still takes it
        router.workers["w1"].client.report = _stats(waiting=60)
        with pytest.raises(OverloadedError) as refused:
            await router.admit(_request("both_full"))
        assert refused.value.retry_after_s >= 1
        assert router.metrics.rejected.labels("worker_queue_full")._value.get() == 1

    asyncio.run(scenario())


def test_a_wait_estimate_past_the_deadline_is_refused(router):
    async def scenario():
        for w in router.workers.values():
            _saturate(w, waiting=20, tokens_per_s=100.0)
        # 20 ahead, 100 tokens each, 100 tok/s: 20 s > 10 s
        with pytest.raises(OverloadedError, match="wait about 20 s"):
            await router.admit(_request("long", max_tokens=100))
        await router.admit(_request("short", max_tokens=10))  # 20 x 10 / 100 = 2 s: in time
        assert router.metrics.rejected.labels("wait_estimate")._value.get() == 1
        # the finished requests' lengths replace max_tokens once known
        for i in range(3):
            router.request_log.finish(0.0, 0.1, 1.0, prompt_tokens=20, cached_tokens=0, output_tokens=10)
        await router.admit(_request("long_asked_short_done", max_tokens=100))

    asyncio.run(scenario())


def test_shedding_can_be_turned_off():
    router = Router(LocalDiscovery(), RouterConfig(max_waiting_per_worker=0, shed_on_wait_estimate=False))
    worker = router.workers["w0"] = Worker(_Client("w0"))
    router.index.add_worker("w0")
    _saturate(worker, waiting=10_000, tokens_per_s=1.0)

    async def scenario():
        await router.admit(_request("a"))

    asyncio.run(scenario())
    router.fleet.events.close()


def test_a_queued_request_is_refused_when_its_deadline_is_out_of_reach(router):
    async def scenario():
        for w in router.workers.values():
            w.pending_prefill_tokens = router.config.max_pending_prefill_tokens  # every worker full
        queued = asyncio.create_task(router.admit(_request("queued", max_tokens=10)))
        await asyncio.sleep(0.01)
        assert len(router.admission) == 1
        # room again, but the workers' queues now hold 20 s of work for a 10 s deadline
        for w in router.workers.values():
            w.pending_prefill_tokens = 0
            _saturate(w, waiting=49, tokens_per_s=20.0)
        router.admission.wake()
        with pytest.raises(OverloadedError, match="would wait"):
            await queued
        assert len(router.admission) == 0 and router.metrics.queue_depth._value.get() == 0

    asyncio.run(scenario())


def test_the_shedding_knobs_are_in_the_frontend_section_with_their_bounds():
    deployment = parse_deployment({"workers": [{"role": "both"}],
                                   "frontend": {"max_waiting_per_worker": 0, "shed_on_wait_estimate": False}})
    assert deployment.router_config() == RouterConfig(max_waiting_per_worker=0, shed_on_wait_estimate=False)
    with pytest.raises(DeploymentError, match="frontend.max_waiting_per_worker"):
        parse_deployment({"workers": [{"role": "both"}], "frontend": {"max_waiting_per_worker": -1}}, "my.yaml")


# ---- the deadline on a worker --------------------------------------------------------------------

async def _slow_stream(delay_s: float, aborted: list[bool]):
    try:
        await asyncio.sleep(delay_s)
        yield TokenDelta(request_id="r", new_token_ids=[7], finished=True, finish_reason="length")
    finally:
        aborted.append(True)


def test_first_delta_refuses_a_request_still_queued_on_its_worker():
    worker = Worker(_Client("w"))
    worker.client.report = _stats(waiting=3)

    async def take(stream, deadline, refuse):
        async with contextlib.aclosing(stream):
            first = await first_delta(stream, deadline, worker, refuse)
            return [first] + [d async for d in stream] if first is not None else []

    async def scenario():
        aborted: list[bool] = []
        started = time.monotonic()
        with pytest.raises(OverloadedError):
            await take(_slow_stream(5.0, aborted), started + 0.1, lambda: OverloadedError("late", retry_after_s=2))
        assert time.monotonic() - started < 1.0 and aborted == [True]  # the worker's stream was closed
        # no queue on the worker: a slow first token (a long prompt) waits on past the deadline
        worker.client.report = _stats(waiting=0)
        deltas = await take(_slow_stream(0.2, []), time.monotonic() + 0.05, lambda: OverloadedError("late"))
        assert [d.new_token_ids for d in deltas] == [[7]]

    asyncio.run(scenario())


# ---- through a real server -----------------------------------------------------------------------

QUEUE_TIMEOUT_S = 2.0


@pytest.fixture()
def small_sim(tmp_path):
    """One simulated worker with room for about four requests at once (64 KV blocks of 16 tokens,
    each request ~120 tokens), 50 ms a step: a 64-token reply takes ~3.2 s, past the 2 s deadline."""
    args = ["--workers", "1", "--timing", "base_s=0.05", "--router", "round_robin", "--num-kv-blocks", "32",
            "--queue-timeout-s", str(QUEUE_TIMEOUT_S)]
    with running_server(args, tmp_path / "sim.log", command="sim") as url:
        yield url


def test_a_burst_far_over_capacity_is_shed_within_the_deadline_then_the_server_recovers(small_sim):
    """A first wave queues on the worker and is refused at the deadline; a second wave, once the
    worker's rate is measured, is refused at once on its estimated wait; then the server serves again."""
    async def one(client: httpx.AsyncClient, i: int) -> tuple[int, str | None, float]:
        body = {"model": "sim", "prompt": f"request {i}: " + "tell me about the sea " * 8, "max_tokens": 64}
        started = time.monotonic()
        reply = await client.post("/v1/completions", json=body)
        return reply.status_code, reply.headers.get("retry-after"), time.monotonic() - started

    async def waves(first: int, second: int, gap_s: float):
        async with httpx.AsyncClient(base_url=small_sim, timeout=60) as client:
            wave1 = asyncio.gather(*(one(client, i) for i in range(first)))
            await asyncio.sleep(gap_s)
            wave2 = await asyncio.gather(*(one(client, first + i) for i in range(second)))
            return await wave1, wave2

    before = metrics(small_sim)
    wave1, wave2 = asyncio.run(waves(30, 30, gap_s=1.5))
    results = wave1 + wave2
    ok = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] == 503]
    assert len(ok) + len(refused) == 60, results
    assert ok and len(refused) >= 40, results
    assert all(retry is not None and int(retry) >= 1 for _, retry, _ in refused)
    # no refused request waited much past the deadline (the 2-core box's frontend adds its share),
    # and the second wave's were refused at admission, long before it
    assert max(elapsed for _, _, elapsed in refused) < QUEUE_TIMEOUT_S + 3.0, sorted(r[2] for r in refused)
    assert sorted(elapsed for status, _, elapsed in wave2 if status == 503)[len(wave2) // 2] < QUEUE_TIMEOUT_S / 2
    after = metrics(small_sim)

    def refusals(reason: str) -> float:
        key = f'tidal_router_rejected_total{{reason="{reason}"}}'
        return after.get(key, 0.0) - before.get(key, 0.0)
    assert refusals("first_token_timeout") > 0 and refusals("wait_estimate") + refusals("worker_queue_full") > 0
    assert sum(refusals(r) for r in ("first_token_timeout", "wait_estimate", "worker_queue_full", "queue_full",
                                     "queue_timeout")) == len(refused)
    # full recovery: once the burst is over, requests within capacity all succeed
    async def calm():
        async with httpx.AsyncClient(base_url=small_sim, timeout=60) as client:
            return await asyncio.gather(*(one(client, i) for i in range(3)))
    assert [r[0] for r in asyncio.run(calm())] == [200, 200, 200]
    assert metrics(small_sim)["tidal_router_queue_depth"] == 0
