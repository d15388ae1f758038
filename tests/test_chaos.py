"""Workers that die are restarted (`tidal.deploy.launcher` with `tidal.deploy.supervisor.RestartPolicy`).

- The launcher (dummy model, requests straight to the router): a killed worker comes back with its
  id, role and spec, is counted, serves again; one exit past `restarts.max_restarts` and it stays
  down, with a log line that says so.
- `tidal serve -f examples/disagg.yaml` (embedded model, one decode worker): its decode worker killed,
  the service answers again once the restart is in, not 503 for good; the restart is on /metrics and
  in the log with the signal.
- Chaos, `examples/disagg_router.yaml` (two prefill, two decode workers): greedy streams run while a
  random worker gets SIGKILL every few seconds (one per role down at a time) for a minute: no request fails, every text
  equals the uninterrupted run's, no KV block is left used, and every killed worker is back.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import signal
import time

import httpx
import openai
import pytest

from _fleet import Fleet, deployment as fleet_deployment
from _server import example_config, metrics, running_server

MODEL = "SmolLM2-135M-Instruct"
MAX_TOKENS = 16
TOPICS = ("the sea", "a lighthouse", "the moon", "sailing", "a harbour", "fishing boats", "storms", "sand dunes",
          "a river delta", "coral reefs", "seagulls", "an old map")
FAST_RESTARTS = {"backoff_s": 0.3, "max_backoff_s": 1.0}


# ---- the launcher ---------------------------------------------------------------------------------


async def _until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {timeout_s:.0f}s"
        await asyncio.sleep(0.05)


def _restarts(fleet: Fleet, worker_id: str, role: str) -> float:
    return fleet.launcher.restarts.labels(worker=worker_id, role=role)._value.get()


async def test_a_killed_worker_comes_back_with_its_id_and_role_until_the_limit(caplog):
    caplog.set_level(logging.INFO, logger="tidal.deploy.launcher")
    base = fleet_deployment(prefill=1, decode=1)
    section = type(base.restarts)(max_restarts=1, window_s=600, **FAST_RESTARTS)
    async with Fleet(base.model_copy(update={"restarts": section})) as fleet:
        launcher, router = fleet.launcher, fleet.router
        before = launcher.procs["decode-0"]
        launcher.kill_worker("decode-0")
        await _until(lambda: "decode-0" not in router.workers, 10, "removal of the dead worker")
        await _until(lambda: "decode-0" in router.workers and router.workers["decode-0"].routable, 60,
                     "restarted decode-0")
        after = launcher.procs["decode-0"]
        assert after.process.pid != before.process.pid and after.spec == before.spec
        assert router.workers["decode-0"].client.role == "decode"
        assert _restarts(fleet, "decode-0", "decode") == 1
        assert "decode-0 (role=decode, pid %d) was killed by SIGKILL" % before.process.pid in caplog.text
        assert await fleet.request(long=True) == "length"  # prefilled remotely, decoded by the new decode-0

        launcher.kill_worker("decode-0")  # a second exit within the window: past max_restarts=1
        await _until(lambda: "stays down" in caplog.text, 10, "log line of the give-up")
        await asyncio.sleep(1.5)  # longer than any backoff: no restart comes
        assert "decode-0" not in router.workers and not launcher.procs["decode-0"].process.is_alive()
        assert _restarts(fleet, "decode-0", "decode") == 1


async def test_a_worker_that_leaves_on_sigterm_is_not_restarted():
    async with Fleet(fleet_deployment(prefill=0, decode=2)) as fleet:
        fleet.launcher.terminate_worker("decode-1")
        await _until(lambda: fleet.launcher.procs["decode-1"].reported, 30, "exit of decode-1")
        await asyncio.sleep(0.5)
        assert fleet.launcher.procs["decode-1"].restart_at is None
        assert not fleet.launcher.procs["decode-1"].process.is_alive()


# ---- tidal serve --------------------------------------------------------------------------------


def _workers(url: str) -> list[dict]:
    return httpx.get(url + "/admin/workers", timeout=10).json()["workers"]


def _wait_workers(url: str, ids: set[str], timeout_s: float) -> list[dict]:
    """Until every worker in `ids` is routable (connected, healthy, not draining) with nothing in use."""
    deadline = time.monotonic() + timeout_s
    while True:
        workers = [w for w in _workers(url) if w["worker_id"] in ids]
        ready = [w for w in workers if w["healthy"] and not w["draining"] and w["stats"] is not None]
        busy = [w for w in ready if w["stats"]["kv_blocks_used"] or w["stats"]["num_running"]
                or w["stats"]["num_waiting"] or w["stats"]["num_held_kv"] or w["stats"]["num_waiting_for_kv"]]
        if len(ready) == len(ids) and not busy:
            return workers
        assert time.monotonic() < deadline, f"workers not all back and free: {workers}"
        time.sleep(0.2)


def _restart_metric(url: str) -> dict[str, float]:
    """The workers restarted so far (every worker's series exists from its start, at 0)."""
    return {k: v for k, v in metrics(url).items() if k.startswith("tidal_worker_restarts_total") and v}


def _chat(url: str, content: str) -> httpx.Response:
    body = {"model": MODEL, "temperature": 0, "max_tokens": 4, "messages": [{"role": "user", "content": content}]}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=60)


@pytest.mark.slow
def test_one_decode_worker_killed_the_service_answers_again_after_its_restart(tmp_path):
    config = example_config(tmp_path, "disagg.yaml", restarts=FAST_RESTARTS)
    log = tmp_path / "server.log"
    with running_server(["-f", str(config)], log) as url:
        _wait_workers(url, {"prefill-0", "decode-0"}, 120)
        assert _chat(url, "Hello!").status_code == 200
        [victim] = [w for w in _workers(url) if w["worker_id"] == "decode-0"]
        os.kill(victim["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 120
        while (reply := _chat(url, "Hello again!")).status_code != 200 or \
                not any(w["worker_id"] == "decode-0" and w["pid"] != victim["pid"] for w in _workers(url)):
            assert reply.status_code in (200, 503), reply.text
            assert time.monotonic() < deadline, "the service did not answer again after the restart"
            time.sleep(0.5)
        assert _restart_metric(url) == {'tidal_worker_restarts_total{role="decode",worker="decode-0"}': 1.0}
        text = log.read_text()
        assert f"worker decode-0 (role=decode, pid {victim['pid']}) was killed by SIGKILL" in text
        assert "restarted worker decode-0 (role=decode" in text


CHAOS_S = 60.0
KILL_EVERY_S = 3.0
CLIENTS = 6


async def _stream(client: openai.AsyncOpenAI, topic: str) -> str:
    stream = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": f"Write a few sentences about {topic}."}],
        temperature=0, max_tokens=MAX_TOKENS, stream=True, extra_body={"ignore_eos": True})
    return "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])


async def _client_loop(client: openai.AsyncOpenAI, first: int, stop: asyncio.Event, results: list) -> None:
    """Streams TOPICS one after another from `first` until `stop`; each result is (topic, text or error)."""
    i = first
    while not stop.is_set():
        topic = TOPICS[i % len(TOPICS)]
        try:
            results.append((topic, await _stream(client, topic)))
        except Exception as exc:  # noqa: BLE001 - every failure is reported by the test
            results.append((topic, exc))
        i += 1


async def _killer(url: str, stop: asyncio.Event, kills: list[str]) -> None:
    """Every KILL_EVERY_S, SIGKILL a random routable worker whose role keeps another routable one
    (victims restart meanwhile, so at most one per role is down at a time)."""
    rng = random.Random(17)
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        while not stop.is_set():
            await asyncio.sleep(KILL_EVERY_S)
            workers = (await http.get("/admin/workers")).json()["workers"]
            ready = sorted((w["role"], w["worker_id"], w["pid"]) for w in workers if w["healthy"] and not w["draining"])
            roles = [role for role, _, _ in ready]
            candidates = [(worker_id, pid) for role, worker_id, pid in ready if roles.count(role) > 1]
            if not candidates or stop.is_set():
                continue
            worker_id, pid = rng.choice(candidates)
            os.kill(pid, signal.SIGKILL)
            kills.append(worker_id)


async def _chaos(url: str) -> tuple[list, list[str]]:
    stop, results, kills = asyncio.Event(), [], []
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120) as client:
        tasks = [asyncio.create_task(_client_loop(client, i * 2, stop, results)) for i in range(CLIENTS)]
        killer = asyncio.create_task(_killer(url, stop, kills))
        await asyncio.sleep(CHAOS_S)
        stop.set()
        await asyncio.gather(*tasks, killer)
    return results, kills


@pytest.mark.slow
def test_chaos_random_workers_killed_under_streaming_load(tmp_path):
    # Prompts (~40 tokens) over the threshold prefill on the prefill workers: all four roles see traffic.
    config = example_config(tmp_path, "disagg_router.yaml", disaggregation={"local_prefill_threshold": 16},
                            restarts={"max_restarts": 50, **FAST_RESTARTS})
    log = tmp_path / "server.log"
    ids = {"prefill-0", "prefill-1", "decode-0", "decode-1"}
    with running_server(["-f", str(config)], log) as url:
        _wait_workers(url, ids, 120)

        async def uninterrupted() -> dict[str, str]:
            async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as client:
                texts = await asyncio.gather(*(_stream(client, topic) for topic in TOPICS))
            return dict(zip(TOPICS, texts))

        baseline = asyncio.run(uninterrupted())
        results, kills = asyncio.run(_chaos(url))
        failed = [(topic, r) for topic, r in results if isinstance(r, BaseException)]
        assert not failed, failed
        assert len(kills) >= 3, kills  # a CPU worker takes 10-30 s to come back on a 2-core box
        different = [(topic, text) for topic, text in results if text != baseline[topic]]
        assert not different, different
        workers = _wait_workers(url, ids, 120)  # every killed worker back, no block used anywhere
        assert {w["worker_id"] for w in workers} == ids
        restarts = _restart_metric(url)
        assert sum(restarts.values()) == len(kills), (restarts, kills)
        assert len(re.findall(r"restarted worker \S+ \(role=", log.read_text())) == len(kills)
        print(f"{len(results)} streams, {len(kills)} kills: {kills}")
