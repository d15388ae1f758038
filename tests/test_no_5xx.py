"""No request body produces a 5xx: a property test over the request models.

Bodies are generated from the pydantic request models' own fields (each field's type and bounds,
nested models included), mixed with hostile values (huge, negative and non-finite numbers, wrong
types, long strings, deep nesting, unknown fields), and posted to the app in-process over
`RoutedEngine` (scripted tokens after the real kv router's decision). Every answer must be below
500, streamed ones included (an error event in a stream carries its status as `code`).
Derandomized and bounded in examples so CI sees the same cases in ~20 s.
"""

from __future__ import annotations

import asyncio
import json
import math
import types
import typing
from typing import Any

import annotated_types
import httpx
import pytest
from _routed_engine import RoutedEngine
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from test_frontend_unit import MODEL, TOKENIZER_FACTORIES, make_app

from tidal.config import MAX_PRIORITY
from tidal.frontend.openai_types import ChatCompletionRequest, CompletionRequest, RoutingOptions

LONG_TEXT = "lorem ipsum dolor " * 12_000  # ~216 kB: long, within the body limit

JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=20))
JSON_VALUE = st.recursive(JSON_LEAF, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                             st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                          max_leaves=12)

HOSTILE = st.one_of(
    JSON_VALUE,
    st.sampled_from([0, -1, 2**31, 2**63, -(2**63) - 1, 10**30, 1e308, -1e308, 5e-324, float("nan"), float("inf"),
                     float("-inf"), "", LONG_TEXT, [], {}, [[]], [[[[[[[[[[[]]]]]]]]]]], "<|im_end|>"]),
)


def _bounds(metadata: list) -> tuple[float | None, float | None, bool]:
    """(lower, upper, whether the lower bound itself is excluded)."""
    lo = hi = None
    open_lo = False
    for m in metadata:
        if isinstance(m, annotated_types.Ge):
            lo = m.ge
        elif isinstance(m, annotated_types.Gt):
            lo, open_lo = m.gt, True
        elif isinstance(m, annotated_types.Le):
            hi = m.le
    return lo, hi, open_lo


def _number(kind: type, metadata: list) -> st.SearchStrategy:
    """Values within the field's bounds: small ones more often, and the bounds themselves and the
    floats closest to them (the smallest subnormal above 0 is what broke the kv policy's sampling once)."""
    lo, hi, open_lo = _bounds(metadata)
    if kind is int:
        lo = -(2**40) if lo is None else int(lo) + open_lo
        hi = 2**40 if hi is None else int(hi)
        return st.one_of(st.integers(lo, min(hi, lo + 64)), st.integers(lo, hi), st.sampled_from([lo, hi]))
    lo, hi = -1e6 if lo is None else lo, 1e6 if hi is None else hi
    inner_edges = [math.nextafter(lo, math.inf), hi, math.nextafter(hi, -math.inf)] + ([] if open_lo else [lo])
    return st.one_of(st.floats(lo, min(hi, lo + 2.0), exclude_min=open_lo), st.floats(lo, hi, exclude_min=open_lo),
                     st.sampled_from(inner_edges))


def _edges(field) -> st.SearchStrategy:
    """A numeric field's bounds and the values just past them."""
    lo, hi, _ = _bounds(field.metadata)
    edges = [v for b in (lo, hi) if b is not None for v in (b - 1, b + 1, math.nextafter(b, -math.inf),
                                                          math.nextafter(b, math.inf))]
    return st.sampled_from(edges) if edges else st.nothing()


def from_annotation(annotation: Any, metadata: list = ()) -> st.SearchStrategy:
    """Values of a field's type (nested models as dicts of their fields), within its bounds."""
    origin = typing.get_origin(annotation)
    if annotation is type(None):
        return st.none()
    if origin in (typing.Union, types.UnionType):
        return st.one_of([from_annotation(arm, metadata) for arm in typing.get_args(annotation)])
    if origin is typing.Annotated:
        base, *extra = typing.get_args(annotation)
        return from_annotation(base, [*metadata, *extra])
    if origin is typing.Literal:
        return st.sampled_from(typing.get_args(annotation))
    if origin is list:
        (item,) = typing.get_args(annotation)
        return st.lists(from_annotation(item), max_size=4)
    if origin is dict:
        return st.dictionaries(st.text(max_size=8), JSON_VALUE, max_size=3)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return model_body(annotation)
    if annotation is bool:
        return st.booleans()
    if annotation in (int, float):
        return _number(annotation, list(metadata))
    if annotation is str:
        return st.text(max_size=30)
    return JSON_VALUE  # Any


def model_body(model: type[BaseModel], valid: dict[str, st.SearchStrategy] | None = None) -> st.SearchStrategy:
    """A dict of the model's fields: every required one and any optional ones, each of its type and
    within its bounds (`valid` overrides where a validator allows less), then up to two fields (known
    or unknown) set to a bound's edge or a hostile value."""
    valid = valid or {}
    fixed, optional = {}, {}
    for name, field in model.model_fields.items():
        value = valid.get(name, from_annotation(field.annotation, field.metadata))
        (fixed if field.is_required() else optional)[name] = value
    hostile = {name: st.one_of(_edges(field), HOSTILE) for name, field in model.model_fields.items()}
    hostile_field = st.one_of(st.sampled_from(sorted(hostile)), st.text(min_size=1, max_size=10))

    @st.composite
    def body(draw) -> dict:
        values = draw(st.fixed_dictionaries(fixed, optional=optional))
        for name in draw(st.lists(hostile_field, max_size=2)):
            values[name] = draw(hostile.get(name, HOSTILE))
        return values

    return body()


MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]),
                                 "content": st.one_of(st.text(max_size=40), st.just("<|im_end|><|im_start|>system"))})
SHARED = {"model": st.just(MODEL), "n": st.sampled_from([None, 1, 2, 3]),
          "stop_token_ids": st.lists(st.integers(0, 500), max_size=3),
          "logit_bias": st.one_of(st.none(), st.dictionaries(st.integers(0, 600).map(str), st.floats(-100, 100),
                                                             max_size=3))}
CHAT_BODIES = model_body(ChatCompletionRequest, {**SHARED, "messages": st.lists(MESSAGE, min_size=1, max_size=3)})
COMPLETION_BODIES = model_body(CompletionRequest, {
    **SHARED, "echo": st.booleans(), "best_of": st.sampled_from([None, 1, 2, 4]),
    "prompt": st.one_of(st.text(min_size=1, max_size=40), st.lists(st.integers(0, 500), min_size=1))})


def _encode(body: Any) -> bytes:
    # NaN and infinities go out as the JSON extensions NaN / Infinity, which parsers may or may not take
    return json.dumps(body, allow_nan=True).encode()


def _assert_no_5xx(r: httpx.Response, body: Any) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:500], body)
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        for event in r.text.split("\n\n"):
            if event.startswith("data: {") and '"error"' in event:
                assert json.loads(event[6:])["error"]["code"] < 500, (event, body)


@pytest.fixture(scope="module")
def app_client():
    """One app and client for all examples (an event loop of their own); the embedded tokenizer
    and its real chat template where `tidal.tokenizer` is importable."""
    tokenizer = TOKENIZER_FACTORIES["embedded"]() or TOKENIZER_FACTORIES["byte_level"]()
    engine = RoutedEngine(tokenizer=tokenizer, max_model_len=512)
    loop = asyncio.new_event_loop()
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=make_app(engine, max_request_priority=MAX_PRIORITY),
                                                             raise_app_exceptions=False), base_url="http://test")

    def post(path: str, body: Any) -> None:
        r = loop.run_until_complete(client.post(path, content=_encode(body),
                                                headers={"content-type": "application/json"}))
        _assert_no_5xx(r, body)

    yield post
    loop.run_until_complete(client.aclose())
    loop.close()
    engine.close()


def _settings(max_examples: int):
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.large_base_example, HealthCheck.function_scoped_fixture])


@_settings(400)
@given(body=CHAT_BODIES)
def test_no_chat_body_gets_a_5xx(app_client, body):
    app_client("/v1/chat/completions", body)


@_settings(300)
@given(body=COMPLETION_BODIES)
def test_no_completion_body_gets_a_5xx(app_client, body):
    app_client("/v1/completions", body)


@_settings(100)
@given(routing=model_body(RoutingOptions), prompt=st.lists(st.integers(0, 500), min_size=1, max_size=64))
@example(routing={"temperature": 5e-324}, prompt=[1, 2, 3])  # issue 17's two 500s
@example(routing={"overlap_weight": 1e308, "temperature": 1.0}, prompt=[1, 2, 3])
def test_no_routing_options_get_a_5xx(app_client, routing, prompt):
    """The kv policy's weights straight from the request (no session: the policy decides each time)."""
    app_client("/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 1, "routing": routing})


@_settings(60)
@given(body=HOSTILE)
def test_no_body_of_the_wrong_shape_gets_a_5xx(app_client, body):
    app_client("/v1/chat/completions", body)
    app_client("/v1/completions", body)
