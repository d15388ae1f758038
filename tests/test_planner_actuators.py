"""The planner's actuators on real CPU worker processes (dummy:tiny-llama), in this process's loop.

- A decode worker flipped to prefill and back while 24 streaming requests run (long prompts that go
  remote, short ones that stay local): every request completes, no KV block is left used or held on
  any worker, and the flipped worker's unavailability (drain finished -> back in routing) is < 1 s.
- A worker added and one removed under load: no request fails, the removed worker's process is
  gone, the added one gets work.
- A flip made by one router while another router replica (another API server) keeps sending work:
  the drain reaches the other replica through the worker, so the flip finishes, every request of
  both finishes, and the other replica routes to the worker in its new role.
"""

from __future__ import annotations

import asyncio

import pytest

from _fleet import Fleet as _Fleet, deployment as _deployment
from tidal.protocol import AddRequest, SamplingParams
from tidal.router.service import Router

pytestmark = pytest.mark.slow


async def test_flip_under_load_drops_nothing_and_rejoins_fast():
    async with _Fleet(_deployment(prefill=1, decode=2)) as fleet:
        tasks = fleet.load(24)
        stop = asyncio.Event()
        feeder = asyncio.create_task(fleet.feed(tasks, stop))  # new requests keep arriving throughout
        await asyncio.sleep(0.3)
        to_prefill = await fleet.actuator.flip_worker("decode-1", "prefill")
        assert fleet.router.workers["decode-1"].client.role == "prefill"
        assert fleet.busy_elsewhere("decode-1")  # flipped under load
        await asyncio.sleep(0.5)  # long prompts may now prefill on decode-1
        to_decode = await fleet.actuator.flip_worker("decode-1", "decode")
        assert fleet.busy_elsewhere("decode-1")
        await asyncio.sleep(0.3)
        stop.set()
        await feeder
        reasons = await asyncio.gather(*tasks)
        assert reasons == ["length"] * len(tasks) and len(tasks) > 40
        await fleet.wait_all_free()
        assert fleet.launcher.procs["decode-1"].info.role == "decode"
        stats = fleet.router.workers["decode-1"].client.stats()
        assert stats.prefill_tokens_total > 0 and stats.steps_total > 0
        for flip in (to_prefill, to_decode):
            print(f"flip {flip.worker_id} -> {flip.role}: drain {flip.drain_s * 1e3:.1f} ms, unavailable "
                  f"{flip.unavailable_s * 1e3:.1f} ms, total {flip.total_s * 1e3:.1f} ms ({len(tasks)} requests)")
            assert flip.unavailable_s < 1.0


async def test_set_role_is_refused_while_the_worker_has_requests():
    from tidal.errors import RoleChangeError

    async with _Fleet(_deployment(prefill=0, decode=1)) as fleet:
        task = asyncio.create_task(fleet.request(long=True, max_tokens=200))
        while not fleet.router.workers["decode-0"].inflight:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        with pytest.raises(RoleChangeError, match="still has"):
            await fleet.router.set_role("decode-0", "prefill")
        assert await task == "length"
        assert fleet.router.workers["decode-0"].client.role == "decode"


async def test_add_and_remove_under_load():
    async with _Fleet(_deployment(prefill=1, decode=1)) as fleet:
        first = fleet.load(16)
        added = await fleet.actuator.add_worker("decode")
        assert added == "decode-1"
        second = fleet.load(16)
        await asyncio.sleep(0.2)
        removed = fleet.launcher.procs["prefill-0"].process
        await fleet.actuator.remove_worker("prefill-0")
        third = fleet.load(8)  # no prefill worker now: every prompt prefills on its decode worker
        assert await asyncio.gather(*first, *second, *third) == ["length"] * 40
        assert not removed.is_alive() and "prefill-0" not in fleet.router.workers
        assert "prefill-0" not in {w.worker_id for w in fleet.launcher.discovery.list()}
        await fleet.wait_all_free()
        assert fleet.router.workers[added].client.stats().generation_tokens > 0


def test_a_flip_takes_the_new_roles_scheduler_limits():
    """Each role has its own limits (a prefill worker's budget is its prefill knee, a decode worker's
    batch cap keeps ITL in target): the launcher resolves them per role, the engine applies them."""
    from tidal import LLM
    from tidal.deploy.config import parse_deployment
    from tidal.deploy.launcher import Launcher

    deployment = parse_deployment({
        "model": "dummy:tiny-llama",
        "workers": [{"role": "prefill", "engine": {"token_budget": 512, "max_num_seqs": 8}},
                    {"role": "decode", "engine": {"token_budget": 64, "max_num_seqs": 96}}]}, "test")
    launcher = Launcher(deployment)
    assert (launcher.role_limits("prefill").token_budget, launcher.role_limits("prefill").max_num_seqs) == (512, 8)
    assert (launcher.role_limits("decode").token_budget, launcher.role_limits("decode").max_num_seqs) == (64, 96)
    engine = LLM("dummy:tiny-llama", num_kv_blocks=32).engine
    engine.set_scheduler_limits(512, None)
    assert (engine.scheduler.config.token_budget, engine.scheduler.config.max_num_seqs) == (512, 128)


async def _stream(router: Router, request_id: str, prompt_len: int) -> str:
    add = AddRequest(request_id=request_id, prompt_token_ids=[100 + (i * 37) % 30000 for i in range(prompt_len)],
                     sampling_params=SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
    last = None
    async for delta in router.generate(add):
        assert delta.error is None, delta.error
        last = delta
    return last.finish_reason


async def test_a_flip_by_one_replica_reaches_every_replica():
    async with _Fleet(_deployment(prefill=0, decode=2)) as fleet:
        replica = Router(fleet.launcher.discovery, fleet.router.config, client_tag="replica/")
        await replica.start()
        await replica.wait_ready(timeout_s=60)
        try:
            stop = asyncio.Event()
            tasks: list[asyncio.Task] = []
            saw_drained = asyncio.Event()

            async def feed() -> None:  # the other replica's clients keep coming
                while not stop.is_set():
                    tasks.append(asyncio.create_task(_stream(replica, f"other-{len(tasks)}", 12)))
                    if not replica.workers["decode-1"].routable:
                        saw_drained.set()
                    await asyncio.sleep(0.02)

            feeder = asyncio.create_task(feed())
            await asyncio.sleep(0.3)
            flip = await asyncio.wait_for(fleet.actuator.flip_worker("decode-1", "prefill"), 60)
            await asyncio.sleep(0.3)
            stop.set()
            await feeder
            assert saw_drained.is_set()  # the other replica stopped routing to it during the drain
            assert all(reason == "length" for reason in await asyncio.gather(*tasks)) and len(tasks) > 10
            assert replica.workers["decode-1"].client.role == "prefill"
            assert replica.workers["decode-1"].routable  # undrained everywhere
            print(f"flip seen by both replicas: drain {flip.drain_s * 1e3:.1f} ms, total {flip.total_s * 1e3:.1f} ms")
        finally:
            await replica.close()
