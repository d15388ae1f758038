"""Request migration and graceful leaving, on real CPU worker processes (dummy:tiny-llama) driven
from the test's event loop (launcher + router, requests as token ids; see _fleet.py).

- `resume_request` and the engine's `num_resumed_tokens`: a request continued from its streamed
  tokens gives the tokens an uninterrupted run gives, greedy and seeded.
- A decode worker killed (SIGKILL) under 20 streams (1 prefill + 2 decode): every stream completes
  with exactly the tokens of a run without the kill, the migrations are counted, and no KV block
  stays used on the surviving workers.
- With max_migrations 0 the same kill gives the clear error.
- A worker sent SIGTERM under load: it is drained at once (its health endpoint turns 503), exits
  within its grace period, and no request fails (those still running at the end of the grace
  period move).
"""

from __future__ import annotations

import asyncio
import random
import time

import httpx
import pytest

from _fleet import Fleet
from tidal.runtime.ports import free_port
from tidal.deploy.config import parse_deployment
from tidal.errors import EngineDeadError
from tidal.protocol import AddRequest, SamplingParams
from tidal.router.migration import resume_request

pytestmark = pytest.mark.slow

PROMPT_TOKENS = (12, 160)  # below and above the remote-prefill threshold (64)
GRACE_S = 2.0


def _deployment(prefill: int, decode: int, health_port: int | None = None, **frontend):
    return parse_deployment({
        "model": "dummy:tiny-llama",
        "frontend": frontend,
        "engine": {"dtype": "float32", "num_kv_blocks": 512, "token_budget": 256, "seed": 1},
        "disaggregation": {"local_prefill_threshold": 64},
        "restarts": {"max_restarts": 0},  # a killed worker stays down: these tests follow its requests
        "workers": [{"role": role, "count": n, "num_threads": 1, "stop_grace_s": GRACE_S,
                     **({"health_port": health_port} if role == "decode" and health_port else {})}
                    for role, n in (("prefill", prefill), ("decode", decode)) if n],
    })


def _requests(n: int, max_tokens: int, seed: int = 0) -> list[AddRequest]:
    rng = random.Random(seed)
    return [AddRequest(request_id=f"m{seed}-{i}", prompt_token_ids=[rng.randrange(100, 40000)
                                                                    for _ in range(PROMPT_TOKENS[i % 2])],
                       sampling_params=SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
            for i in range(n)]


async def _run(router, request: AddRequest, started: asyncio.Event | None = None) -> list[int]:
    """One stream's tokens; checks the deltas the client would see (no error, one finish, prompt usage)."""
    tokens: list[int] = []
    last = None
    async for delta in router.generate(request):
        assert delta.error is None, delta.error
        assert last is None or not last.finished
        if delta.num_prompt_tokens:
            assert delta.num_prompt_tokens == len(request.prompt_token_ids)
        tokens.extend(delta.new_token_ids)
        if started is not None and len(tokens) >= 3:
            started.set()
        last = delta
    assert last.finished and last.finish_reason == "length"
    return tokens


def _migrations(router) -> dict[str, float]:
    return {s.labels["reason"]: s.value for m in router.metrics.migrations.collect() for s in m.samples
            if s.name == "tidal_request_migrations_total"}


async def _wait_streaming(fleet, worker_id: str, n: int) -> None:
    """Until `worker_id` runs at least n requests (its latest load snapshot says so; requests routed
    to it but still prefilling on a prefill worker do not count)."""
    deadline = time.monotonic() + 30
    while (stats := fleet.router.workers[worker_id].client.stats()) is None or stats.num_running < n:
        assert time.monotonic() < deadline, "the worker never got its share of streams"
        await asyncio.sleep(0.01)


# ---- pure parts --------------------------------------------------------------------------------


def test_resume_request_moves_streamed_tokens_into_the_prompt():
    request = AddRequest(request_id="r", prompt_token_ids=[1, 2, 3],
                         sampling_params=SamplingParams(max_tokens=10, min_tokens=4, seed=7))
    assert resume_request(request, []) is request
    moved = resume_request(request, [9, 8, 7])
    assert moved.prompt_token_ids == [1, 2, 3, 9, 8, 7] and moved.num_resumed_tokens == 3
    assert (moved.sampling_params.max_tokens, moved.sampling_params.min_tokens) == (7, 1)
    assert moved.sampling_params.seed == 7 and moved.request_id == "r"
    assert resume_request(request, list(range(10))) is None


@pytest.mark.parametrize("temperature, seed", [(0.0, None), (1.0, 1234)])
def test_a_resumed_request_continues_an_uninterrupted_run(temperature, seed):
    from tidal import LLM

    llm = LLM("dummy:tiny-llama", dtype="float32", num_kv_blocks=128)
    engine = llm.engine
    request = AddRequest(request_id="full", prompt_token_ids=list(range(100, 140)),
                         sampling_params=SamplingParams(max_tokens=24, temperature=temperature, seed=seed,
                                                        ignore_eos=True))

    def run(add: AddRequest) -> list[int]:
        engine.add_request(add)
        tokens, done = [], False
        while not done:
            for delta in engine.step():
                assert delta.error is None, delta.error
                tokens += delta.new_token_ids
                done = done or delta.finished
        return tokens

    full = run(request)
    cut = 9
    moved = resume_request(msgspec_replace(request, request_id="moved"), full[:cut])
    assert full[:cut] + run(moved) == full
    llm.close()


def msgspec_replace(struct, **changes):
    import msgspec

    return msgspec.structs.replace(struct, **changes)


# ---- a worker killed, a worker leaving -------------------------------------------------------------


async def test_killed_decode_worker_streams_move_with_identical_outputs():
    async with Fleet(_deployment(prefill=1, decode=2)) as fleet:
        router = fleet.router
        baseline = await asyncio.gather(*(_run(router, r) for r in _requests(20, 48)))
        await fleet.wait_all_free()
        started = asyncio.Event()
        tasks = [asyncio.create_task(_run(router, r, started)) for r in _requests(20, 48)]
        await started.wait()
        await _wait_streaming(fleet, "decode-1", 5)
        fleet.launcher.kill_worker("decode-1")
        outputs = await asyncio.gather(*tasks)
        assert outputs == baseline
        moved = _migrations(router)
        assert moved["worker_died"] >= 5, moved
        assert "decode-1" not in router.workers
        await fleet.wait_all_free()  # nothing used, held or pulled on the survivors


async def test_past_max_migrations_the_client_gets_the_error():
    async with Fleet(_deployment(prefill=0, decode=2, max_migrations=0)) as fleet:
        started = asyncio.Event()
        tasks = [asyncio.create_task(_run(fleet.router, r, started)) for r in _requests(8, 200, seed=1)]
        await started.wait()
        await _wait_streaming(fleet, "decode-0", 1)
        fleet.launcher.kill_worker("decode-0")
        results = await asyncio.gather(*tasks, return_exceptions=True)
        errors = [r for r in results if isinstance(r, Exception)]
        assert errors and all(isinstance(e, EngineDeadError) for e in errors), results
        assert "decode-0 died while serving this request" in str(errors[0])
        assert sum(_migrations(fleet.router).values()) == 0
        await fleet.wait_all_free()


async def test_sigterm_drains_the_worker_and_drops_nothing():
    port = free_port()  # decode-0's health endpoint; decode-1's is the next one
    async with Fleet(_deployment(prefill=1, decode=2, health_port=port)) as fleet:
        router = fleet.router
        health = f"http://127.0.0.1:{port + 1}"
        assert httpx.get(health + "/health").json() == {"worker_id": "decode-1", "status": "ready"}
        short, long = _requests(12, 24, seed=2), _requests(8, 1000, seed=3)  # long ones outlast the grace
        started = asyncio.Event()
        tasks = [asyncio.create_task(_run(router, r, started)) for r in short + long]
        await started.wait()
        await _wait_streaming(fleet, "decode-1", 4)
        process = fleet.launcher.procs["decode-1"].process
        sent = time.monotonic()
        fleet.launcher.terminate_worker("decode-1")
        # Probes first, well inside the grace: a readiness probe takes the worker out, liveness says why.
        while (ready := httpx.get(health + "/health")).status_code == 200:
            assert time.monotonic() - sent < 1, "the leaving worker still says it is ready"
            await asyncio.sleep(0.01)
        assert ready.status_code == 503 and ready.json()["status"] == "leaving"
        assert httpx.get(health + "/live").json()["status"] == "leaving"
        while not router.workers["decode-1"].draining:
            assert time.monotonic() - sent < 2, "the leaving worker was not drained"
            await asyncio.sleep(0.01)
        late = [asyncio.create_task(_run(router, r)) for r in _requests(6, 16, seed=4)]  # routed elsewhere
        await asyncio.to_thread(process.join, 10)
        exited_s = time.monotonic() - sent
        assert process.exitcode == 0 and exited_s < GRACE_S + 1.0, exited_s
        outputs = await asyncio.gather(*tasks, *late)
        assert [len(o) for o in outputs] == [24] * 12 + [1000] * 8 + [16] * 6
        assert _migrations(router)["worker_left"] >= 1, _migrations(router)
        await fleet.wait_all_free()
        print(f"worker exited {exited_s:.2f}s after SIGTERM (grace {GRACE_S:g}s); moved: {_migrations(router)}")
