"""Every number a request controls is bounded (a 400 naming the field, never a 5xx), the kv policy
never raises on weights a request can carry, chat template failures name fields rather than the
server's functions, and an oversized request head gets a 431 rather than a reset connection.

The HTTP tests run the app in-process over `RoutedEngine` (scripted tokens after the real router's
decision); the header tests run it on a real uvicorn.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import socket

import httpx
import pytest
from _routed_engine import RoutedEngine
from hypothesis import given, settings
from hypothesis import strategies as st
from test_frontend_unit import TOKENIZER_FACTORIES, MODEL, ScriptedEngine, chat_body, live_server, make_app

from tidal.config import MAX_PRIORITY, ServerConfig
from tidal.deploy.config import DeploymentError, parse_deployment
from tidal.frontend.http_protocol import HeadLimitedHttpToolsProtocol
from tidal.router.policy import (MAX_KV_TEMPERATURE, MAX_OVERLAP_WEIGHT, KVWeights, WorkerView,
                                 _sample_by_cost, choose_worker)


@pytest.fixture
def engine():
    engine = RoutedEngine()
    yield engine
    engine.close()


@pytest.fixture
async def client(engine):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=make_app(engine)), base_url="http://test") as c:
        yield c


# ---- the kv policy -------------------------------------------------------------------------------


def _views(loads: list[tuple[int, int, int, int]]) -> list[WorkerView]:
    return [WorkerView(f"w{i}", "decode", open_requests=o, pending_prefill_tokens=p, overlap_blocks=b,
                       active_blocks=a) for i, (o, p, b, a) in enumerate(loads)]


@pytest.mark.parametrize("weights", [
    KVWeights(temperature=5e-324),  # issue 17: every logit -inf, then NaN weights
    KVWeights(overlap_weight=MAX_OVERLAP_WEIGHT, temperature=1.0),
    KVWeights(overlap_weight=MAX_OVERLAP_WEIGHT, temperature=5e-324),
    KVWeights(overlap_weight=0.0, temperature=MAX_KV_TEMPERATURE),
])
def test_kv_sampling_takes_extreme_weights(weights):
    views = _views([(0, 10**9, 0, 10**9), (3, 0, 0, 7), (1, 5, 2, 0)])
    picks = {choose_worker(views, "kv", 10**6, 16, 0, random.Random(seed), weights).worker_id for seed in range(20)}
    assert picks <= {"w0", "w1", "w2"}
    if weights.temperature < 1e-300:
        assert len(picks) == 1  # a vanishing temperature is the cheapest worker's


@settings(max_examples=300, deadline=None, derandomize=True)
@given(overlap_weight=st.floats(0.0, MAX_OVERLAP_WEIGHT), temperature=st.floats(0.0, MAX_KV_TEMPERATURE),
       loads=st.lists(st.tuples(*[st.integers(0, 2**40)] * 4), min_size=1, max_size=5),
       prompt_tokens=st.integers(0, 2**31), seed=st.integers(0, 2**32))
def test_kv_policy_never_raises_on_weights_a_request_can_carry(overlap_weight, temperature, loads,
                                                                prompt_tokens, seed):
    views = _views(loads)
    chosen = choose_worker(views, "kv", prompt_tokens, 16, 0, random.Random(seed),
                           KVWeights(overlap_weight=overlap_weight, temperature=temperature))
    assert chosen in views


def test_kv_sampling_falls_back_to_the_cheapest_on_costs_that_are_not_finite():
    views = _views([(0, 0, 0, 0)] * 3)
    rng = random.Random(0)
    assert _sample_by_cost(views, [math.inf, 3.0, math.inf], 1.0, rng) is views[1]
    assert _sample_by_cost(views, [2.0, 1.0, 3.0], math.inf, rng) is views[1]
    assert _sample_by_cost(views, [1.0, 1e308, 1e308], 1e-300, rng) is views[0]


@pytest.mark.parametrize("field, value", [("overlap_weight", -1.0), ("overlap_weight", math.inf),
                                          ("overlap_weight", MAX_OVERLAP_WEIGHT * 2), ("temperature", math.nan),
                                          ("temperature", MAX_KV_TEMPERATURE + 1)])
def test_kv_weights_refuse_values_out_of_bounds(field, value):
    with pytest.raises(ValueError, match=field):
        KVWeights(**{field: value})


# ---- request numbers over HTTP -------------------------------------------------------------------


async def test_issue_17_routing_bodies_are_answered(client, engine):
    r = await client.post("/v1/chat/completions", json=chat_body(routing={"temperature": 5e-324}))
    assert r.status_code == 200, r.text
    assert engine.requests[-1].routing.temperature == 5e-324  # it reached the router's sampling
    r = await client.post("/v1/chat/completions", json=chat_body(routing={"overlap_weight": 1e308, "temperature": 1.0}))
    assert r.status_code == 400 and r.json()["error"]["param"] == "routing.overlap_weight"
    r = await client.post("/v1/chat/completions",
                          json=chat_body(routing={"overlap_weight": MAX_OVERLAP_WEIGHT, "temperature": 1.0}))
    assert r.status_code == 200, r.text


NUMBER_CASES = [
    ({"routing": {"overlap_weight": -0.5}}, "routing.overlap_weight"),
    ({"routing": {"temperature": MAX_KV_TEMPERATURE * 10}}, "routing.temperature"),
    ({"routing": {"temperature": "hot"}}, "routing.temperature"),
    ({"temperature": 1e6}, "temperature"),
    ({"max_tokens": 2**31}, "max_tokens"),
    ({"max_completion_tokens": 10**40}, "max_completion_tokens"),
    ({"stop_token_ids": [2**40]}, "stop_token_ids"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"seed": -(2**63) - 1}, "seed"),
    ({"top_k": 2**31}, "top_k"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"priority": MAX_PRIORITY + 1}, "priority"),
    ({"priority": 1}, "priority"),  # the default server lets no client set a priority
    ({"priority": -1}, "priority"),
]


@pytest.mark.parametrize("fields, param", NUMBER_CASES)
async def test_request_numbers_out_of_bounds_are_400_naming_the_field(client, engine, fields, param):
    r = await client.post("/v1/chat/completions", json=chat_body(**fields))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and param.split(".")[-1] in r.json()["error"]["message"]
    assert engine.requests == []


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e400"])
async def test_non_finite_json_numbers_are_400(client, engine, literal):
    for field in (b'"temperature"', b'"routing": {"temperature"'):
        closing = b"}" if field.startswith(b'"routing"') else b""
        body = b'{"model": "%s", "messages": [{"role": "user", "content": "x"}], %s: %s%s}' % (
            MODEL.encode(), field, literal, closing)
        r = await client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
    assert engine.requests == []


async def test_priority_within_the_servers_limit_reaches_the_router():
    engine = RoutedEngine()
    app = make_app(engine, max_request_priority=10)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
        for priority in (-10, 0, 10):
            r = await c.post("/v1/completions", json={"model": MODEL, "prompt": "x", "priority": priority})
            assert r.status_code == 200, r.text
        assert [r.routing.priority if r.routing else 0 for r in engine.requests] == [-10, 0, 10]
        r = await c.post("/v1/completions", json={"model": MODEL, "prompt": "x", "priority": 11})
        assert r.status_code == 400 and "between -10 and 10" in r.json()["error"]["message"]
    engine.close()


def test_max_request_priority_is_a_bounded_frontend_knob():
    d = parse_deployment({"workers": [{"role": "both"}], "frontend": {"max_request_priority": 50}})
    assert d.server_config().max_request_priority == 50
    assert ServerConfig().max_request_priority == 0
    with pytest.raises(DeploymentError, match="frontend.max_request_priority"):
        parse_deployment({"workers": [{"role": "both"}], "frontend": {"max_request_priority": MAX_PRIORITY + 1}})
    with pytest.raises(ValueError, match="max_request_header_bytes"):
        ServerConfig(max_request_header_bytes=10)


# ---- chat template errors ------------------------------------------------------------------------


INTERNALS = ("apply_chat_template", "Tokenizer", "Traceback", "tidal.", "TypeError", "got multiple values")


@pytest.mark.parametrize("kwargs", [{"messages": []}, {"add_generation_prompt": False}, {"tools": []},
                                    {"chat_template": "{{ 1 }}"}])
async def test_chat_template_kwargs_cannot_set_the_templates_own_arguments(client, engine, kwargs):
    r = await client.post("/v1/chat/completions", json=chat_body(chat_template_kwargs=kwargs))
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "chat_template_kwargs"
    assert next(iter(kwargs)) in error["message"]
    assert not any(word in error["message"] for word in INTERNALS), error["message"]


@pytest.mark.parametrize("tokenizer_kind", ["byte_level", "embedded"])
async def test_chat_template_failures_name_fields_not_functions(tokenizer_kind):
    tokenizer = TOKENIZER_FACTORIES[tokenizer_kind]()
    if tokenizer is None:
        pytest.skip("tidal.tokenizer is not available")
    engine = ScriptedEngine(tokenizer=tokenizer, max_model_len=2048)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=make_app(engine)), base_url="http://test") as c:
        # `self` collides with the tokenizer method's own parameter: a TypeError naming that method
        r = await c.post("/v1/chat/completions", json=chat_body(chat_template_kwargs={"self": 1}))
        error = r.json()["error"]
        assert r.status_code == 400 and error["param"] == "chat_template_kwargs", r.text
        assert not any(word in error["message"] for word in INTERNALS), error["message"]
        assert (await c.post("/v1/chat/completions", json=chat_body())).status_code == 200


# ---- request heads -------------------------------------------------------------------------------


def _raw_request(port: int, header_value: bytes, body: bytes) -> bytes:
    """One request with a header of `header_value` over a plain socket; everything the server sent."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                     b"X-Big: " + header_value + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


async def test_a_1mb_request_header_gets_431_not_a_reset():
    engine = ScriptedEngine()
    async with live_server(make_app(engine)) as url:
        port = int(url.rsplit(":", 1)[1])
        body = json.dumps(chat_body()).encode()
        answer = await asyncio.to_thread(_raw_request, port, b"a" * (1 << 20), body)
        assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
        error = json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
        assert error["code"] == 431 and "65536" in error["message"]
        async with httpx.AsyncClient(base_url=url) as c:
            r = await c.post("/v1/chat/completions", json=chat_body(), headers={"x-big": "b" * (1 << 20)})
            assert r.status_code == 431 and r.json()["error"]["type"] == "RequestHeaderFieldsTooLargeError"
            r = await c.post("/v1/chat/completions", json=chat_body(), headers={"x-fine": "c" * 30_000})
            assert r.status_code == 200
            # a large body (in the same reads as its head) is not counted as head
            r = await c.post("/v1/completions", json={"model": MODEL, "prompt": [1] * 700_000})  # 2 MB
            assert r.status_code == 400 and "context length" in r.json()["error"]["message"]
            for _ in range(50):  # keep-alive requests add up to no head
                assert (await c.post("/v1/completions", json={"model": MODEL, "prompt": [1] * 200})).status_code == 200
    assert len(engine.requests) == 51


async def test_head_limit_follows_the_server_config():
    engine = ScriptedEngine()
    app = make_app(engine)
    from tidal.frontend.app import make_http_server
    server = make_http_server(app, ServerConfig(port=0, max_request_header_bytes=4096))
    assert server.config.http.func is HeadLimitedHttpToolsProtocol
    assert server.config.http.keywords == {"max_head_bytes": 4096}
    assert server.config.h11_max_incomplete_event_size == 4096
