"""Request fields through the official `openai` client, streaming and not, against the HTTP layer over
`ScriptedEngine` (a TEST DOUBLE: scripted tokens, no model; it records what reached it): what each
sampling field becomes in `SamplingParams`, and the 400s for fields the server doesn't know or accepts
only at their no-op value. What the real engine does with the fields is in tests/test_sampling_e2e.py.
"""

from __future__ import annotations

import openai
import pytest
from test_frontend_unit import BYTE_LEVEL, MODEL, ScriptedEngine, live_server, make_app

from tidal.frontend.openai_types import ChatCompletionRequest, CompletionRequest

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
def engine():
    return ScriptedEngine()


@pytest.fixture
async def client(engine):
    async with live_server(make_app(engine)) as url, \
            openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0) as c:
        yield c


async def _both(client, endpoint: str, stream: bool, **kwargs):
    """One request to `endpoint` ("chat" or "completions"), its stream read to the end."""
    if endpoint == "chat":
        create, kwargs = client.chat.completions.create, {"messages": MESSAGES, **kwargs}
    else:
        create, kwargs = client.completions.create, {"prompt": "hi", **kwargs}
    reply = await create(model=MODEL, stream=stream, **kwargs)
    if stream:
        return [chunk async for chunk in reply]
    return reply


BOTH = [(endpoint, stream) for endpoint in ("chat", "completions") for stream in (False, True)]


@pytest.mark.parametrize("endpoint, stream", BOTH)
async def test_penalties_and_logit_bias_reach_the_engine(client, engine, endpoint, stream):
    await _both(client, endpoint, stream, presence_penalty=1.5, frequency_penalty=-0.5,
                logit_bias={"12": -100, "3": 7}, extra_body={"repetition_penalty": 1.3})
    p = engine.requests[-1].sampling_params
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (1.5, -0.5, 1.3)
    assert p.logit_bias == ((3, 7.0), (12, -100.0))
    await _both(client, endpoint, stream)
    p = engine.requests[-1].sampling_params  # the defaults: off
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty, p.logit_bias) == (0.0, 0.0, 1.0, ())


@pytest.mark.parametrize("fields, param", [
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -2.01}, "frequency_penalty"),
    ({"extra_body": {"repetition_penalty": 0}}, "repetition_penalty"),
    ({"extra_body": {"repetition_penalty": 1000}}, "repetition_penalty"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"logit_bias": {"-1": 1}}, "logit_bias"),
    ({"logit_bias": {"007": 1}}, "logit_bias"),
    ({"logit_bias": {str(BYTE_LEVEL.vocab_size): 1}}, "logit_bias"),  # outside the vocabulary
    ({"logit_bias": {str(i): 1 for i in range(1025)}}, "logit_bias"),
])
@pytest.mark.parametrize("endpoint", ["chat", "completions"])
async def test_sampling_values_out_of_range_are_400s(client, engine, endpoint, fields, param):
    with pytest.raises(openai.BadRequestError) as caught:
        await _both(client, endpoint, False, **fields)
    assert caught.value.body["param"] == param
    assert engine.requests == []


@pytest.mark.parametrize("endpoint, stream", BOTH)
async def test_stop_strings_with_and_without_the_stop_text(client, engine, endpoint, stream):
    """The scripted text is "The capital of France is Paris."."""

    def text(reply) -> str:
        if not stream:
            choice = reply.choices[0]
            return choice.message.content if endpoint == "chat" else choice.text
        pieces = [(c.choices[0].delta.content if endpoint == "chat" else c.choices[0].text) or "" for c in reply
                  if c.choices]
        return "".join(pieces)

    cut = await _both(client, endpoint, stream, stop=[" of", "zzz"], max_tokens=50)
    kept = await _both(client, endpoint, stream, stop=" of", max_tokens=50,
                       extra_body={"include_stop_str_in_output": True})
    assert text(cut) == "The capital" and text(kept) == "The capital of"
    assert engine.requests[-1].sampling_params.stop == (" of",)


@pytest.mark.parametrize("endpoint, stream", BOTH)
async def test_min_tokens_and_ignore_eos_reach_the_engine(client, engine, endpoint, stream):
    await _both(client, endpoint, stream, max_tokens=20, extra_body={"min_tokens": 4, "ignore_eos": True})
    p = engine.requests[-1].sampling_params
    assert (p.min_tokens, p.ignore_eos, p.max_tokens) == (4, True, 20)


# ---- fields the server does not know -------------------------------------------------------------


@pytest.mark.parametrize("endpoint, name, value", [
    ("chat", "use_beam_search", True), ("chat", "best_of", 2), ("chat", "echo", True), ("chat", "suffix", "x"),
    ("chat", "guided_decoding_backend", "x"), ("chat", "bad_words", ["x"]), ("chat", "prompt_logprobs", 1),
    ("chat", "truncate_prompt_tokens", 5), ("completions", "messages", []), ("completions", "top_logprobs", 2),
    ("completions", "store", False), ("chat", "some_unknown_field", None),
])
@pytest.mark.parametrize("stream", [False, True])
async def test_unknown_fields_are_400s_naming_them(client, engine, endpoint, name, value, stream):
    with pytest.raises(openai.BadRequestError) as caught:
        await _both(client, endpoint, stream, extra_body={name: value})
    error = caught.value.body
    assert error["param"] == name and error["message"] == f"Unrecognized request argument supplied: {name}"
    assert engine.requests == []


async def test_unknown_fields_inside_nested_objects_are_400s(client, engine):
    with pytest.raises(openai.BadRequestError) as caught:
        await _both(client, "chat", True, stream_options={"include_usage": True, "include_gizmos": True})
    assert caught.value.body["param"] == "stream_options.include_gizmos"
    with pytest.raises(openai.BadRequestError) as caught:
        await _both(client, "chat", False, extra_body={"routing": {"temperature": 1.0, "weight": 2}})
    assert caught.value.body["param"] == "routing.weight"
    with pytest.raises(openai.BadRequestError) as caught:  # stream_options without stream asks for nothing
        await _both(client, "completions", False, stream_options={"include_usage": True})
    assert caught.value.body["param"] == "stream_options"


NO_OP_CASES = [  # (field, a value that asks nothing, a value that asks for what Tidal doesn't do)
    ("store", False, True),
    ("service_tier", "auto", "flex"),
    ("service_tier", "default", "priority"),
    ("modalities", ["text"], ["text", "audio"]),
    ("metadata", {}, {"project": "x"}),
    ("prompt_cache_retention", "in_memory", "24h"),
    ("prompt_cache_options", None, {"mode": "explicit"}),
    ("audio", None, {"voice": "alloy", "format": "wav"}),
    ("prediction", None, {"type": "content", "content": "x"}),
    ("moderation", None, {"model": "omni-moderation-latest"}),
    ("safety_identifier", None, "user-123"),
    ("verbosity", None, "low"),
    ("web_search_options", None, {}),
]


@pytest.mark.parametrize("name, no_op, refused", NO_OP_CASES)
async def test_openai_fields_tidal_does_not_implement_are_accepted_only_as_no_ops(client, engine, name, no_op,
                                                                                  refused):
    reply = await _both(client, "chat", False, extra_body={name: no_op})
    assert reply.choices[0].message.content == engine.text
    stream = await _both(client, "chat", True, extra_body={name: None})
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == engine.text
    with pytest.raises(openai.BadRequestError) as caught:
        await _both(client, "chat", False, extra_body={name: refused})
    assert caught.value.body["param"] == name and "not supported" in caught.value.body["message"]
    assert len(engine.requests) == 2


async def test_completion_suffix_and_stream_obfuscation_only_as_no_ops(client, engine):
    await _both(client, "completions", False, suffix="")
    await _both(client, "completions", True, suffix=None, stream_options={"include_obfuscation": False})
    for kwargs, param in [({"suffix": " end"}, "suffix"),
                          ({"stream_options": {"include_obfuscation": True}}, "stream_options.include_obfuscation")]:
        with pytest.raises(openai.BadRequestError) as caught:
            await _both(client, "completions", True, **kwargs)
        assert caught.value.body["param"] == param
    assert len(engine.requests) == 2


async def test_prompt_cache_key_is_the_routing_session(client, engine):
    await _both(client, "chat", False, prompt_cache_key="conversation-7", user="alice")
    await _both(client, "completions", True, user="bob")
    assert [r.routing.session_id for r in engine.requests] == ["conversation-7", "bob"]


def _declared(model) -> set[str]:
    return set(model.model_fields)


# Fields other helpers of issue 18 declare (structured outputs, tool calls); named here so that this
# table of OpenAI's request fields stays complete.
OWNED_ELSEWHERE = {"response_format", "tools", "tool_choice", "parallel_tool_calls", "reasoning_effort",
                   "functions", "function_call"}
OPENAI_CHAT_FIELDS = {
    "messages", "model", "audio", "frequency_penalty", "function_call", "functions", "logit_bias", "logprobs",
    "max_completion_tokens", "max_tokens", "metadata", "modalities", "moderation", "n", "parallel_tool_calls",
    "prediction", "presence_penalty", "prompt_cache_key", "prompt_cache_options", "prompt_cache_retention",
    "reasoning_effort", "response_format", "safety_identifier", "seed", "service_tier", "stop", "store", "stream",
    "stream_options", "temperature", "tool_choice", "tools", "top_logprobs", "top_p", "user", "verbosity",
    "web_search_options"}
OPENAI_COMPLETION_FIELDS = {
    "model", "prompt", "best_of", "echo", "frequency_penalty", "logit_bias", "logprobs", "max_tokens", "n",
    "presence_penalty", "seed", "stop", "stream", "stream_options", "suffix", "temperature", "top_p", "user"}


def test_every_openai_request_field_is_declared():
    """Each of OpenAI's own fields (openai 2.x / 3.x client) is declared: implemented or no-op only (so an
    official client's request is never refused as unrecognized), unless another helper owns it."""
    assert OPENAI_CHAT_FIELDS - OWNED_ELSEWHERE <= _declared(ChatCompletionRequest)
    assert OPENAI_COMPLETION_FIELDS - OWNED_ELSEWHERE <= _declared(CompletionRequest)
