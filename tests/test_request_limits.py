"""What the frontend bounds per request: the prompt's length before tokenizing, the default output
length, the time a request may run; and the event loop stays free while a long prompt is tokenized.

The engine is the scripted test double of test_frontend_unit (no model runs)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from tests.test_frontend_unit import (MODEL, ScriptedEngine, chat_body, endless_script, live_server,
                                      make_app, parse_sse)


def asgi_client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


class CountingEncode:
    """Wraps the double's tokenizer so a test sees whether anything was tokenized."""

    def __init__(self, engine: ScriptedEngine, monkeypatch) -> None:
        self.calls = 0
        original = engine.tokenizer.encode

        def encode(text, add_special_tokens=True):
            self.calls += 1
            return original(text, add_special_tokens=add_special_tokens)

        monkeypatch.setattr(engine.tokenizer, "encode", encode)


async def test_a_prompt_longer_than_the_context_can_hold_is_refused_before_tokenizing(monkeypatch):
    engine = ScriptedEngine(max_model_len=256)  # at 32 characters a token: 8192 characters
    app = make_app(engine)
    counting = CountingEncode(engine, monkeypatch)
    async with asgi_client(app) as client:
        r = await client.post("/v1/chat/completions", json=chat_body(
            messages=[{"role": "user", "content": "tide " * 2000}]))
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
        assert "characters" in r.json()["error"]["message"]
        r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x" * 8193})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        assert counting.calls == 0 and not engine.requests
        r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "tide " * 1000})
        assert r.status_code == 400 and "tokens" in r.json()["error"]["message"]  # tokenized, then too long
        assert counting.calls == 1


async def test_chat_without_max_tokens_is_capped_by_the_server_default():
    engine = ScriptedEngine(max_model_len=256)
    async with asgi_client(make_app(engine, default_max_tokens=7)) as client:
        assert (await client.post("/v1/chat/completions", json=chat_body())).status_code == 200
        assert engine.requests[-1].sampling_params.max_tokens == 7
        assert (await client.post("/v1/chat/completions", json=chat_body(max_tokens=20))).status_code == 200
        assert engine.requests[-1].sampling_params.max_tokens == 20  # what the client asks for wins
        assert (await client.post("/v1/completions", json={"model": MODEL, "prompt": "hi"})).status_code == 200
        assert engine.requests[-1].sampling_params.max_tokens == 7  # OpenAI's 16, within the cap
    async with asgi_client(make_app(engine, default_max_tokens=None)) as client:
        await client.post("/v1/chat/completions", json=chat_body())
        request = engine.requests[-1]
        assert request.sampling_params.max_tokens == 256 - len(request.prompt_token_ids)


@pytest.mark.parametrize("delay_s", [0.01, 60.0])  # tokens flowing; an engine that says nothing
async def test_a_request_past_its_deadline_gets_408_and_is_aborted(delay_s):
    engine = ScriptedEngine(delay_s=delay_s)
    engine.script = endless_script
    async with asgi_client(make_app(engine, request_deadline_s=0.3)) as client:
        start = time.monotonic()
        r = await client.post("/v1/chat/completions", json=chat_body())
        assert r.status_code == 408 and r.json()["error"]["code"] == "request_timeout"
        assert time.monotonic() - start < 5
        assert not engine.active and engine.closed_early == [engine.requests[0].request_id]


async def test_a_stream_past_its_deadline_ends_with_an_error_event():
    engine = ScriptedEngine(delay_s=0.01)
    engine.script = endless_script
    async with asgi_client(make_app(engine, request_deadline_s=0.3)) as client:
        r = await client.post("/v1/chat/completions", json=chat_body(stream=True))
        events = parse_sse(r.text)
        assert any(e["choices"] and e["choices"][0]["delta"].get("content") for e in events[:-1])
        assert events[-1]["error"]["code"] == "request_timeout"
        assert not engine.active and len(engine.closed_early) == 1


async def test_a_request_that_finishes_in_time_is_untouched_by_its_deadline():
    engine = ScriptedEngine(delay_s=0.01)
    async with asgi_client(make_app(engine, request_deadline_s=2.0)) as client:
        r = await client.post("/v1/chat/completions", json=chat_body(stream=True, max_tokens=5))
        assert parse_sse(r.text)[-1]["choices"][0]["finish_reason"] is not None
        await asyncio.sleep(0.1)
        assert (await client.post("/v1/chat/completions", json=chat_body())).status_code == 200


async def test_health_answers_while_a_long_prompt_is_tokenized():
    from tidal.tokenizer import load_tokenizer

    engine = ScriptedEngine(tokenizer=load_tokenizer(None), max_model_len=65536)
    content = " ".join(f"tide{i % 977} moon harbour" for i in range(80_000))  # ~1.8M characters
    async with live_server(make_app(engine)) as url, httpx.AsyncClient(base_url=url, timeout=120) as client:
        chat = asyncio.create_task(client.post("/v1/chat/completions", json=chat_body(
            messages=[{"role": "user", "content": content}], max_tokens=1)))
        await asyncio.sleep(0.3)  # the body is in and being tokenized
        slowest_s, polls = 0.0, 0
        while not chat.done():
            start = time.monotonic()
            assert (await client.get("/health")).status_code == 200
            slowest_s, polls = max(slowest_s, time.monotonic() - start), polls + 1
            await asyncio.sleep(0.05)
        r = await chat
    assert r.status_code == 400 and "tokens" in json.loads(r.text)["error"]["message"]  # tokenized whole
    assert polls >= 3, "tokenizing ended too soon for the test to say anything"
    assert slowest_s < 0.5, f"/health took {slowest_s:.2f} s while a prompt was tokenized"
