"""End to end: `tidal serve -f examples/agg_router.yaml` (two aggregated workers, embedded model)
with workers killed under load, through the official `openai` client.

- /live and /health: both 200 while a worker can serve; the migration counter is on /metrics.
- A worker killed (SIGKILL) while 20 greedy streams run: every stream completes without an error,
  with the text and usage of a run without the kill; `tidal_request_migrations_total` counts the
  moves; the killed worker is restarted and both end with no KV block used.
- `--max-migrations 0` and no restarts: the streams of a killed worker end with the clear error;
  once every worker is gone /health is 503 while /live stays 200.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import openai
import pytest

from _server import example_config, metrics, running_server

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
STREAMS = 20
MAX_TOKENS = 24
TOPICS = ("the sea", "a lighthouse", "the moon", "sailing", "a harbour", "fishing boats", "storms", "sand dunes",
          "a river delta", "coral reefs", "seagulls", "an old map", "a compass", "the tide", "waves", "a ferry",
          "the horizon", "a shipwreck", "an island", "the trade winds")


def _workers(url: str) -> list[dict]:
    return httpx.get(url + "/admin/workers", timeout=10).json()["workers"]


def _migrated(url: str) -> float:
    return sum(v for k, v in metrics(url).items() if k.startswith("tidal_request_migrations_total"))


async def _stream(client: openai.AsyncOpenAI, topic: str, progress: list[int], i: int):
    """One greedy stream; returns (text, usage). `progress[i]` counts its content chunks."""
    stream = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": f"Write a few sentences about {topic}."}],
        temperature=0, max_tokens=MAX_TOKENS, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True})
    text, usage = [], None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = (chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
        if chunk.choices and chunk.choices[0].delta.content:
            text.append(chunk.choices[0].delta.content)
            progress[i] += 1
    return "".join(text), usage


async def _burst(url: str, kill: str | None = None, n: int = STREAMS) -> list:
    """n concurrent streams; with `kill`, that worker gets SIGKILL once every stream is going.
    Each result is (text, usage) or the exception its stream raised."""
    progress = [0] * n
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300) as client:
        tasks = [asyncio.create_task(_stream(client, topic, progress, i)) for i, topic in enumerate(TOPICS[:n])]
        if kill is not None:
            deadline = time.monotonic() + 120
            while min(progress) < 2:
                assert time.monotonic() < deadline, progress
                await asyncio.sleep(0.02)
            victim = next(w for w in _workers(url) if w["worker_id"] == kill)
            assert victim["open_requests"] >= 3, victim  # it dies with streams on it
            os.kill(victim["pid"], signal.SIGKILL)
        return await asyncio.gather(*tasks, return_exceptions=True)


def _wait_all_free(url: str, timeout_s: float = 20) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        workers = _workers(url)
        busy = [w for w in workers if w["stats"] is None or w["stats"]["kv_blocks_used"] or w["stats"]["num_running"]
                or w["stats"]["num_waiting"]]
        if not busy:
            return workers
        assert time.monotonic() < deadline, f"blocks still used: {busy}"
        time.sleep(0.1)


def test_killed_worker_streams_complete_as_without_the_kill(tmp_path):
    path = example_config(tmp_path, "agg_router.yaml", frontend={"router": "round_robin"})
    with running_server(["-f", str(path)], tmp_path / "server.log") as url:
        assert httpx.get(url + "/live").status_code == 200
        health = httpx.get(url + "/health")
        assert health.status_code == 200 and health.json()["workers"]["both"] == 2
        assert _migrated(url) == 0
        baseline = asyncio.run(_burst(url))
        assert all(isinstance(r, tuple) for r in baseline), baseline
        results = asyncio.run(_burst(url, kill="both-1"))
        errors = [r for r in results if isinstance(r, BaseException)]
        assert not errors, errors
        assert results == baseline  # same text, same usage (the original prompt's tokens, every output token)
        assert _migrated(url) >= 3
        deadline = time.monotonic() + 120  # the launcher restarts the killed worker
        while sorted(w["worker_id"] for w in _workers(url)) != ["both-0", "both-1"]:
            assert time.monotonic() < deadline, "both-1 did not come back"
            time.sleep(0.5)
        _wait_all_free(url, timeout_s=120)
        assert httpx.get(url + "/health").status_code == 200


def test_past_max_migrations_streams_fail_clearly_and_health_follows_the_workers(tmp_path):
    path = example_config(tmp_path, "agg_router.yaml", frontend={"router": "round_robin"},
                          restarts={"max_restarts": 0})  # killed workers stay down
    with running_server(["-f", str(path), "--max-migrations", "0"], tmp_path / "server.log") as url:
        results = asyncio.run(_burst(url, kill="both-0", n=8))
        errors = [r for r in results if isinstance(r, BaseException)]
        assert errors and all(isinstance(e, openai.APIError) for e in errors), results
        assert all("both-0 died while serving this request" in str(e.body or e) for e in errors), errors
        assert len(errors) < 8 and _migrated(url) == 0  # the other worker's streams finished
        _wait_all_free(url)
        os.kill(_workers(url)[0]["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while httpx.get(url + "/health").status_code != 503:
            assert time.monotonic() < deadline, "/health still says ready with no worker"
            time.sleep(0.1)
        assert httpx.get(url + "/live").status_code == 200
