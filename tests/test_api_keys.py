"""API keys, the admin routes' loopback rule and per-key limits (`tidal.frontend.access`,
`tidal.frontend.key_limits`), through the official `openai` client where it applies.

The app runs in-process over `ScriptedEngine` (tests/test_frontend_unit.py); the concurrency test
runs it on a real uvicorn, since a stream has to stay open while the next request arrives. Several
frontend processes: tests/test_security_e2e.py.
"""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
from test_frontend_unit import (
    MODEL,
    ScriptedEngine,
    chat_body,
    endless_script,
    live_server,
    make_app,
    wait_until,
)

from tidal.config import ServerConfig
from tidal.deploy.config import parse_deployment, redacted
from tidal.frontend.access import is_loopback
from tidal.frontend.key_limits import KeyLimiter

KEYS = ("sk-first", "sk-second")
QUESTION = [{"role": "user", "content": "What is the capital?"}]


def _client(app, key: str | None, client_addr=("127.0.0.1", 123)) -> openai.AsyncOpenAI:
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=client_addr), base_url="http://test")
    return openai.AsyncOpenAI(base_url="http://test/v1", api_key=key or "unused", http_client=http, max_retries=0)


def _http(app, client_addr=("127.0.0.1", 123)) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=client_addr), base_url="http://test")


@pytest.fixture
def engine() -> ScriptedEngine:
    return ScriptedEngine()


@pytest.fixture
def keyed_app(engine):
    return make_app(engine, api_keys=KEYS)


# ---- keys ------------------------------------------------------------------------------------


async def test_wrong_or_missing_key_is_an_authentication_error(keyed_app, engine):
    for key in ("sk-wrong", "sk-first-but-longer", "SK-FIRST", " "):
        async with _client(keyed_app, key) as client:
            with pytest.raises(openai.AuthenticationError) as err:
                await client.chat.completions.create(model=MODEL, messages=QUESTION)
        assert err.value.status_code == 401
        assert err.value.code == "invalid_api_key"
        assert err.value.response.headers["www-authenticate"] == "Bearer"
        assert "sk-" not in err.value.message  # the key sent is not echoed back
    async with _http(keyed_app) as http:
        missing = await http.post("/v1/chat/completions", json=chat_body())
        assert missing.status_code == 401 and "Missing API key" in missing.json()["error"]["message"]
    assert engine.requests == []  # nothing reached the engine


@pytest.mark.parametrize("key", KEYS)
async def test_every_configured_key_works_streaming_and_not(keyed_app, key):
    async with _client(keyed_app, key) as client:
        reply = await client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8)
        assert reply.choices[0].message.content
        chunks = [c async for c in await client.chat.completions.create(model=MODEL, messages=QUESTION,
                                                                         max_tokens=8, stream=True)]
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
            reply.choices[0].message.content
        completion = await client.completions.create(model=MODEL, prompt="Hello", max_tokens=4)
        assert completion.choices[0].text is not None
        assert [m.id for m in (await client.models.list()).data] == [MODEL]


async def test_wrong_key_on_a_stream_is_refused_before_it_starts(keyed_app, engine):
    async with _client(keyed_app, "sk-wrong") as client:
        with pytest.raises(openai.AuthenticationError):
            await client.chat.completions.create(model=MODEL, messages=QUESTION, stream=True)
    assert engine.requests == []


async def test_open_routes_need_no_key_and_the_rest_do(keyed_app):
    async with _http(keyed_app) as http:
        for path in ("/health", "/live", "/version", "/metrics"):
            assert (await http.get(path)).status_code == 200, path
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/tokenize"),
                             ("POST", "/detokenize"), ("GET", "/admin/workers"), ("GET", "/no/such/route"),
                             ("GET", "/health/"), ("GET", "/docs")):
            reply = await http.request(method, path, json={})
            assert reply.status_code == 401, path
            assert reply.json()["error"]["code"] == "invalid_api_key"
        headers = {"Authorization": f"Bearer {KEYS[0]}"}
        assert (await http.get("/admin/workers", headers=headers)).json() == {"workers": []}
        assert (await http.get("/no/such/route", headers=headers)).status_code == 404
        assert (await http.get("/v1/models", headers={"Authorization": f"Basic {KEYS[0]}"})).status_code == 401


async def test_metrics_can_require_a_key(engine):
    app = make_app(engine, api_keys=KEYS, require_api_key_for_metrics=True)
    async with _http(app) as http:
        assert (await http.get("/metrics")).status_code == 401
        assert (await http.get("/metrics", headers={"Authorization": f"Bearer {KEYS[1]}"})).status_code == 200
        assert (await http.get("/health")).status_code == 200


async def test_without_keys_everything_is_open_but_admin_answers_loopback_only(engine):
    app = make_app(engine)
    async with _client(app, None) as client:
        assert (await client.chat.completions.create(model=MODEL, messages=QUESTION)).choices
    for client_addr, status in ((("127.0.0.1", 5), 200), (("::1", 5), 200), (("::ffff:127.0.0.1", 5), 200),
                                (("203.0.113.7", 5), 403), (("10.0.0.2", 5), 403)):
        async with _http(app, client_addr) as http:
            reply = await http.get("/admin/workers")
            assert reply.status_code == status, client_addr
            if status == 403:
                assert reply.json()["error"]["code"] == "forbidden"
            assert (await http.get("/v1/models")).status_code == 200


async def test_with_keys_admin_takes_a_key_from_anywhere(keyed_app):
    async with _http(keyed_app, ("203.0.113.7", 5)) as http:
        assert (await http.get("/admin/workers")).status_code == 401
        assert (await http.get("/admin/workers", headers={"Authorization": f"Bearer {KEYS[0]}"})).status_code == 200


def test_is_loopback():
    assert is_loopback(("127.0.0.2", 1)) and is_loopback(("::1", 1))
    assert not is_loopback(None) and not is_loopback(("example.com", 1)) and not is_loopback(("0.0.0.0", 1))


# ---- per-key limits --------------------------------------------------------------------------


def test_key_limiter_rate_refills_over_the_minute():
    limiter = KeyLimiter(requests_per_minute=3)
    assert [limiter.admit("a", 0.0) for _ in range(3)] == [None] * 3  # a quiet key bursts its minute
    for _ in range(3):
        limiter.release("a")
    refusal = limiter.admit("a", 0.0)
    assert refusal.limit == "requests_per_minute" and refusal.retry_after_s == 20  # one token per 20 s
    assert limiter.admit("b", 0.0) is None  # keys are separate
    assert limiter.admit("a", 19.0).retry_after_s == 1
    assert limiter.admit("a", 20.0) is None
    assert limiter.admit("a", 20.0) is not None
    assert limiter.admit("a", 1000.0) is None  # refills to the cap, no further
    assert [limiter.admit("a", 1000.0) for _ in range(3)][-1] is not None
    assert limiter.open_requests("a") == 4 and limiter.open_requests("b") == 1


def test_key_limiter_concurrency_counts_until_release():
    limiter = KeyLimiter(max_concurrent=2)
    assert limiter.admit("a", 0.0) is None and limiter.admit("a", 0.0) is None
    refusal = limiter.admit("a", 0.0)
    assert refusal.limit == "concurrent_requests" and refusal.retry_after_s >= 1
    assert limiter.open_requests("a") == 2  # a refusal counts nothing
    limiter.release("a")
    assert limiter.admit("a", 0.0) is None
    limiter.release("a")
    limiter.release("a")
    assert limiter.open_requests("a") == 0
    with pytest.raises(AssertionError):
        limiter.release("a")


async def test_rate_limit_is_a_429_with_retry_after_per_key(engine):
    app = make_app(engine, api_keys=KEYS, max_requests_per_minute_per_key=2)
    async with _client(app, KEYS[0]) as first, _client(app, KEYS[1]) as second:
        for _ in range(2):
            await first.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2)
        with pytest.raises(openai.RateLimitError) as err:
            await first.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2, stream=True)
        assert err.value.code == "rate_limit_exceeded"
        assert 1 <= int(err.value.response.headers["retry-after"]) <= 30
        assert (await second.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2)).choices
    async with _http(app) as http:
        assert (await http.get("/health")).status_code == 200  # open routes count against no key
    assert len(engine.requests) == 3


async def test_concurrency_limit_holds_while_a_stream_is_open():
    engine = ScriptedEngine(delay_s=0.01)
    engine.script = endless_script
    app = make_app(engine, api_keys=KEYS, max_concurrent_requests_per_key=1)
    headers = {"Authorization": f"Bearer {KEYS[0]}"}
    async with live_server(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        async with http.stream("POST", "/v1/chat/completions", headers=headers,
                               json=chat_body(stream=True, max_tokens=200)) as stream:
            assert stream.status_code == 200
            await anext(stream.aiter_raw())
            second = await http.post("/v1/chat/completions", headers=headers, json=chat_body())
            assert second.status_code == 429 and second.headers["retry-after"] == "1"
            other = await http.get("/v1/models", headers={"Authorization": f"Bearer {KEYS[1]}"})
            assert other.status_code == 200
        await wait_until(lambda: len(engine.closed_early) == 1)
        engine.script, engine.delay_s = engine.default_script, 0.0
        for _ in range(200):  # the stream's slot frees once its response has ended
            reply = await http.post("/v1/chat/completions", headers=headers, json=chat_body(max_tokens=2))
            if reply.status_code != 429:
                break
            await asyncio.sleep(0.01)
        assert reply.status_code == 200


# ---- configuration ---------------------------------------------------------------------------


def test_keys_come_from_the_environment_when_the_config_names_none(monkeypatch):
    monkeypatch.setenv("TIDAL_API_KEY", "sk-env-1, sk-env-2,")
    d = parse_deployment({"workers": [{"role": "both"}]})
    assert d.server_config().api_keys == ("sk-env-1", "sk-env-2")
    d = parse_deployment({"workers": [{"role": "both"}], "frontend": {"api_keys": ["sk-yaml"]}})
    assert d.server_config().api_keys == ("sk-yaml",)


def test_limits_need_keys_and_keys_stay_out_of_logs(monkeypatch):
    monkeypatch.delenv("TIDAL_API_KEY", raising=False)
    with pytest.raises(ValueError, match="per-key limits need API keys"):
        ServerConfig(max_concurrent_requests_per_key=3)
    with pytest.raises(ValueError, match="must not be empty"):
        ServerConfig(api_keys=("",))
    d = parse_deployment({"workers": [{"role": "both"}], "frontend": {"api_keys": ["sk-secret"]}})
    assert "sk-secret" not in str(redacted(d.model_dump(exclude_defaults=True)))
    assert "sk-secret" not in repr(d.server_config())
