"""Tool calling: the request fields, the prompt (the template's own or Tidal's tool prompt), the
grammar of forced choices, and the calls parsed out of the reply, streaming and not.

The parsers are tested on text cut at every place; the HTTP path runs the real app on uvicorn over
`ScriptedEngine` (test_frontend_unit: a TEST DOUBLE that replays a text as tokens of the embedded
model's tokenizer), so a reply holding tool calls goes through the frontend exactly as a model's
would, and is read back with the official `openai` client.
"""

from __future__ import annotations

import contextlib
import copy
import json
import random

import httpx
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_frontend_unit import (
    MODEL,
    ScriptedEngine,
    byte_level_bpe,
    embedded_tokenizer,
    live_server,
    make_app,
)

from tidal.config import DEFAULT_MODEL_NAME
from tidal.frontend.chat_template_features import TemplateFeatures
from tidal.frontend.openai_types import ChatCompletionRequest
from tidal.frontend.tool_calls import ToolPlan, tool_turns_as_text, with_tool_prompt
from tidal.frontend.tool_parsers import HermesToolParser, JsonCallsParser, NamedCallParser, ToolCallParser

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["C", "F"]}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
TOOLS = [WEATHER, TIME]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
HERMES_REPLY = ('I will check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n'
                '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')
QWEN_LIKE = ("{% if tools %}<|im_start|>system\n<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools>"
             "<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
             "{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>{{ c.function | tojson }}</tool_call>"
             "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}<|im_start|>assistant\n")
LLAMA3_LIKE = ("{% for m in messages %}{{ m['content'] }}{% endfor %}{% if tools %}Given the following functions, "
               "please respond with a JSON for a function call with its proper arguments.{% endif %}"
               "{{ '<|python_tag|>' if false }}")


# ---- parsers ---------------------------------------------------------------------------------------


def parse(parser: ToolCallParser, pieces: list[str]) -> tuple[str, list[list[str]], list]:
    """Feeds the pieces then finishes: (content, [[id, name, arguments]], every call delta)."""
    content, calls, deltas = "", {}, []
    for result in [parser.feed(piece) for piece in pieces] + [parser.finish()]:
        content += result.content
        for delta in result.calls:
            deltas.append(delta)
            if delta.id is not None:
                assert delta.index == len(calls) and delta.arguments == "" and delta.name
                calls[delta.index] = [delta.id, delta.name, ""]
            else:
                assert delta.index in calls and delta.name is None
                calls[delta.index][2] += delta.arguments
    return content, list(calls.values()), deltas


def cuts(text: str, rng: random.Random, max_piece: int) -> list[str]:
    pieces, i = [], 0
    while i < len(text):
        size = rng.randint(1, max_piece)
        pieces.append(text[i:i + size])
        i += size
    return pieces


def names_and_arguments(calls):
    return [(name, json.loads(arguments)) for _, name, arguments in calls]


HERMES_CASES = [
    (HERMES_REPLY, "I will check.", [("get_weather", {"city": "Paris", "unit": "C"}), ("get_time", {})]),
    ("No tools needed: 2 < 3 and x<y.\n", "No tools needed: 2 < 3 and x<y.\n", []),
    # a call whose arguments hold the closing tag and escaped quotes
    ('<tool_call>{"name": "get_weather", "arguments": {"city": "a \\"</tool_call>\\" b"}}</tool_call>', None,
     [("get_weather", {"city": 'a "</tool_call>" b'})]),
    # keys in the other order: read once the object closes
    ('<tool_call>{"arguments": {"city": "Oslo"}, "name": "get_weather"}</tool_call>', None,
     [("get_weather", {"city": "Oslo"})]),
    # arguments as a string holding JSON (some models)
    ('<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}</tool_call>', None,
     [("get_weather", {"city": "Rome"})]),
    # not a call: the block stays content, verbatim
    ("see <tool_call>not json</tool_call> ok", "see <tool_call>not json</tool_call> ok", []),
    ('x <tool_call>{"answer": 42}</tool_call>', 'x <tool_call>{"answer": 42}</tool_call>', []),
    ("ends with a partial tag <tool_c", "ends with a partial tag <tool_c", []),
    # the closing tag left out before the next call
    ('<tool_call>{"name": "get_time", "arguments": {}}\n<tool_call>{"name": "get_time", "arguments": {}}', "",
     [("get_time", {}), ("get_time", {})]),
    ("text\n<tool_call>\n", "text\n<tool_call>\n", []),  # an opened block with nothing in it: verbatim
]


@pytest.mark.parametrize("text,content,calls", HERMES_CASES)
def test_hermes_parser_reads_calls_wherever_the_text_is_cut(text, content, calls):
    rng = random.Random(0)
    whole = parse(HermesToolParser(), [text])
    assert names_and_arguments(whole[1]) == calls
    assert whole[0] == content if content is not None else whole[0] == ""
    for max_piece in (1, 2, 3, 5, 11):
        for _ in range(5):
            got = parse(HermesToolParser(), cuts(text, rng, max_piece))
            assert got[0] == whole[0]
            assert [c[1:] for c in got[1]] == [c[1:] for c in whole[1]]  # same names, same argument text


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=len(HERMES_REPLY)), max_size=12))
def test_hermes_parser_any_cut(cut_points):
    points = sorted(set(cut_points))
    pieces = [HERMES_REPLY[a:b] for a, b in zip([0, *points], [*points, len(HERMES_REPLY)]) if a < b]
    content, calls, _ = parse(HermesToolParser(), pieces)
    assert content == "I will check."
    assert names_and_arguments(calls) == [("get_weather", {"city": "Paris", "unit": "C"}), ("get_time", {})]


def test_call_arguments_stream_in_pieces_and_ids_are_call_hex():
    _, calls, deltas = parse(HermesToolParser(), list(HERMES_REPLY))
    assert len([d for d in deltas if d.id is None and d.index == 0]) > 5  # the arguments arrived as they came
    assert all(call_id.startswith("call_") and len(call_id) > 10 for call_id, _, _ in calls)
    assert len({call_id for call_id, _, _ in calls}) == 2
    assert calls[0][2] == '{"city": "Paris", "unit": "C"}'  # the model's own text, unchanged


def test_parallel_tool_calls_false_keeps_the_first_call():
    content, calls, _ = parse(HermesToolParser(max_calls=1), list(HERMES_REPLY))
    assert content == "I will check." and names_and_arguments(calls) == [("get_weather", {"city": "Paris",
                                                                                           "unit": "C"})]
    reply = '[{"name": "get_time", "parameters": {}}, {"name": "get_weather", "parameters": {"city": "x"}}]'
    _, calls, _ = parse(JsonCallsParser(max_calls=1), [reply])
    assert [name for _, name, _ in calls] == ["get_time"]


def test_a_call_cut_by_the_length_limit_keeps_what_it_has():
    content, calls, _ = parse(HermesToolParser(), ['<tool_call>{"name": "get_weather", "arguments": {"city": "Pa'])
    assert content == "" and calls[0][1:] == ["get_weather", '{"city": "Pa']


JSON_CASES = [
    ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}', "",
     [("get_weather", {"city": "Paris"})]),
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters": {}}', "",
     [("get_weather", {"city": "Paris"}), ("get_time", {})]),
    ('[{"name": "get_time", "parameters": {}}, {"name": "get_weather", "parameters": {"city": "]"}}]', "",
     [("get_time", {}), ("get_weather", {"city": "]"})]),
    ("The weather is fine {really}.", "The weather is fine {really}.", []),
    ('  {"answer": 42} is JSON but no call', '  {"answer": 42} is JSON but no call', []),
    ("[1, 2, 3]", "[1, 2, 3]", []),
]


@pytest.mark.parametrize("text,content,calls", JSON_CASES)
def test_json_calls_parser_reads_llama3_calls_and_forced_arrays(text, content, calls):
    rng = random.Random(1)
    for pieces in [[text], list(text)] + [cuts(text, rng, 4) for _ in range(5)]:
        got_content, got_calls, _ = parse(JsonCallsParser(), pieces)
        assert got_content == content
        assert names_and_arguments(got_calls) == calls


def test_named_call_parser_reads_the_arguments_object():
    for pieces in (['{"city": "Paris"}'], list(' {"city": "Paris"}\n')):
        content, calls, _ = parse(NamedCallParser("get_weather"), pieces)
        assert content == "" and names_and_arguments(calls) == [("get_weather", {"city": "Paris"})]
    content, calls, _ = parse(NamedCallParser("get_weather"), list("sorry, no"))
    assert content == "sorry, no" and calls == []  # a reply no grammar forced stays content


# ---- the plan: prompt, grammar, choice ------------------------------------------------------------------


def test_template_features_come_from_the_syntax_tree():
    smol = TemplateFeatures.of(embedded_tokenizer().chat_template)
    assert not smol.reads_tools and not smol.reads_tool_calls and smol.tool_call_format == "hermes"
    qwen = TemplateFeatures.of(QWEN_LIKE)
    assert qwen.reads_tools and qwen.reads_tool_calls and qwen.tool_call_format == "hermes"
    llama = TemplateFeatures.of(LLAMA3_LIKE)
    assert llama.reads_tools and llama.tool_call_format == "llama3_json"
    quoted = TemplateFeatures.of("{{ 'tools and tool_calls and reasoning_effort' }}{{ messages[0]['content'] }}")
    assert quoted == TemplateFeatures()
    assert TemplateFeatures.of("{{ m.tool_calls }}{{ reasoning_effort }}").reads_reasoning_effort


def plan_for(features: TemplateFeatures | None = None, setting="auto", **fields) -> ToolPlan:
    req = ChatCompletionRequest.model_validate({"model": MODEL, "messages": ASK, **fields})
    return ToolPlan.for_request(req, features or TemplateFeatures(), setting)


def test_parsers_follow_the_choice_and_the_template():
    assert plan_for().parser_factory() is None  # no tools
    assert plan_for(tools=TOOLS, tool_choice="none").parser_factory() is None
    assert isinstance(plan_for(tools=TOOLS).parser_factory()(), HermesToolParser)
    assert isinstance(plan_for(TemplateFeatures.of(LLAMA3_LIKE), tools=TOOLS).parser_factory()(), JsonCallsParser)
    assert isinstance(plan_for(TemplateFeatures.of(LLAMA3_LIKE), "hermes", tools=TOOLS).parser_factory()(),
                      HermesToolParser)
    assert isinstance(plan_for(tools=TOOLS, tool_choice="required").parser_factory()(), JsonCallsParser)
    named = plan_for(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert isinstance(named.parser_factory()(), NamedCallParser)
    assert plan_for(tools=TOOLS, parallel_tool_calls=False).parser_factory()().max_calls == 1


def test_forced_choices_get_a_grammar_their_parser_reads():
    xgrammar = pytest.importorskip("xgrammar")
    from xgrammar.testing import _is_grammar_accept_string as accepts

    assert plan_for(tools=TOOLS).structured_output() is None
    assert plan_for(tools=TOOLS, tool_choice="none").structured_output() is None
    required = plan_for(tools=TOOLS, tool_choice="required").structured_output()
    assert required.kind == "json"
    grammar = xgrammar.Grammar.from_json_schema(required.spec)
    reply = '[{"name": "get_weather", "parameters": {"city": "Paris"}}, {"name": "get_time", "parameters": {}}]'
    assert accepts(grammar, reply)
    assert not accepts(grammar, "[]")
    assert not accepts(grammar, '[{"name": "get_stock", "parameters": {}}]')
    assert not accepts(grammar, '[{"name": "get_weather", "parameters": {"unit": "C"}}]')  # city is required
    assert names_and_arguments(parse(JsonCallsParser(), [reply])[1]) == [("get_weather", {"city": "Paris"}),
                                                                         ("get_time", {})]
    single = plan_for(tools=TOOLS, tool_choice="required", parallel_tool_calls=False).structured_output()
    assert not accepts(xgrammar.Grammar.from_json_schema(single.spec), reply)
    named = plan_for(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    grammar = xgrammar.Grammar.from_json_schema(named.structured_output().spec)
    assert accepts(grammar, '{"city": "Paris", "unit": "F"}') and not accepts(grammar, '{"unit": "F"}')


def test_tool_prompt_and_tool_turns_for_templates_that_ignore_them():
    messages = [{"role": "system", "content": "Be brief."}, *ASK]
    prompted = with_tool_prompt(messages, TOOLS, calls_allowed=True)
    system = prompted[0]["content"]
    assert system.startswith("Be brief.\n\n# Tools") and "<tool_call>" in system
    assert json.dumps(WEATHER) in system and json.dumps(TIME) in system
    assert with_tool_prompt(ASK, TOOLS, calls_allowed=False)[0]["role"] == "system"
    assert "<tool_call>" not in with_tool_prompt(ASK, TOOLS, calls_allowed=False)[0]["content"]
    history = [*ASK, {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
        {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": {}}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "noon"}]
    turns = tool_turns_as_text(history)
    assert [m["role"] for m in turns] == ["user", "assistant", "user"]
    assert turns[1]["content"] == ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
                                   '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')
    assert turns[2]["content"] == "<tool_response>\n18C\n</tool_response>\n<tool_response>\nnoon\n</tool_response>"


# ---- through the server --------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def openai_client(engine: ScriptedEngine, **server):
    async with (live_server(make_app(engine, **server)) as url,
                openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0) as client):
        yield client


def scripted(text: str) -> ScriptedEngine:
    tokenizer = embedded_tokenizer()
    if tokenizer is None:
        pytest.skip("tidal.tokenizer is not available")
    return ScriptedEngine(tokenizer=tokenizer, max_model_len=4096, text=text)


async def ask(client, stream: bool, **fields):
    """(message as a dict, finish_reason, the stream's deltas) the same way for both kinds."""
    fields.setdefault("model", MODEL)
    if not stream:
        reply = await client.chat.completions.create(messages=fields.pop("messages", ASK), **fields)
        message = reply.choices[0].message
        return message.model_dump(), reply.choices[0].finish_reason, []
    chunks = [c async for c in await client.chat.completions.create(
        messages=fields.pop("messages", ASK), stream=True, **fields)]
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    content = "".join(d.content or "" for d in deltas)
    calls: dict[int, dict] = {}
    for delta in deltas:
        for call in delta.tool_calls or ():
            if call.id is not None:
                assert call.index not in calls and call.type == "function" and call.function.arguments == ""
                calls[call.index] = {"id": call.id, "type": "function",
                                     "function": {"name": call.function.name, "arguments": ""}}
            else:
                assert call.function.name is None
                calls[call.index]["function"]["arguments"] += call.function.arguments
    assert deltas[0].role == "assistant"
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    message = {"content": content or None, "tool_calls": list(calls.values()) or None}
    return message, finish[-1], deltas


def calls_of(message) -> list[tuple[str, dict]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"] or ()]


@pytest.mark.parametrize("stream", [False, True])
async def test_calls_in_the_reply_come_back_as_tool_calls(stream):
    engine = scripted(HERMES_REPLY)
    async with openai_client(engine) as client:
        message, finish_reason, _ = await ask(client, stream, tools=TOOLS)
        assert finish_reason == "tool_calls"
        assert message["content"] == "I will check."
        assert calls_of(message) == [("get_weather", {"city": "Paris", "unit": "C"}), ("get_time", {})]
        assert all(c["id"].startswith("call_") for c in message["tool_calls"])
        message, finish_reason, _ = await ask(client, stream, tools=TOOLS, parallel_tool_calls=False)
        assert calls_of(message) == [("get_weather", {"city": "Paris", "unit": "C"})]
        message, finish_reason, _ = await ask(client, stream, tools=TOOLS, tool_choice="none")
        assert finish_reason == "stop" and message["content"] == HERMES_REPLY and not message["tool_calls"]
        message, finish_reason, _ = await ask(client, stream)  # no tools: nothing is parsed
        assert message["content"] == HERMES_REPLY and not message["tool_calls"]
    assert not engine.active


@pytest.mark.parametrize("stream", [False, True])
async def test_a_reply_that_is_only_calls_has_no_content(stream):
    engine = scripted('<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\n')
    async with openai_client(engine) as client:
        message, finish_reason, deltas = await ask(client, stream, tools=TOOLS)
        assert message["content"] is None and calls_of(message) == [("get_time", {})]
        assert finish_reason == "tool_calls"
        assert all(not d.content for d in deltas)  # no whitespace streamed as content either


@pytest.mark.parametrize("stream", [False, True])
async def test_llama3_json_calls(stream):
    engine = scripted('{"name": "get_weather", "parameters": {"city": "Lima"}}')
    async with openai_client(engine, tool_call_parser="llama3_json") as client:
        message, finish_reason, _ = await ask(client, stream, tools=TOOLS)
        assert calls_of(message) == [("get_weather", {"city": "Lima"})] and finish_reason == "tool_calls"
        engine.text = "Lima is sunny."
        message, finish_reason, _ = await ask(client, stream, tools=TOOLS)
        assert message["content"] == "Lima is sunny." and not message["tool_calls"] and finish_reason == "stop"


@pytest.mark.parametrize("stream", [False, True])
async def test_forced_choices_read_the_json_the_grammar_forces(stream):
    """The engine here replays the text a grammar would force; the request carries the grammar."""
    engine = scripted('[{"name": "get_weather", "parameters": {"city": "Quito"}}]')
    async with openai_client(engine) as client:
        message, finish_reason, _ = await ask(client, stream, tools=TOOLS, tool_choice="required")
        assert calls_of(message) == [("get_weather", {"city": "Quito"})] and finish_reason == "tool_calls"
        structured = engine.requests[-1].sampling_params.structured
        assert structured.kind == "json" and json.loads(structured.spec)["minItems"] == 1
        engine.text = '{"city": "Quito"}'
        named = {"type": "function", "function": {"name": "get_weather"}}
        message, finish_reason, _ = await ask(client, stream, tools=TOOLS, tool_choice=named)
        assert calls_of(message) == [("get_weather", {"city": "Quito"})] and finish_reason == "tool_calls"
        assert json.loads(engine.requests[-1].sampling_params.structured.spec) == WEATHER["function"]["parameters"]
        message, _, _ = await ask(client, stream, tools=TOOLS)
        assert engine.requests[-1].sampling_params.structured is None


async def test_call_tags_the_tokenizer_calls_special_stay_in_the_text():
    """Hermes-style models may have <tool_call> as a special token, which decoding would skip."""
    tokenizer = byte_level_bpe()
    tokenizer._tok.add_special_tokens(["<tool_call>", "</tool_call>"])
    tokenizer.all_special_ids = [tokenizer.eos_token_id, *(tokenizer._tok.token_to_id(t)
                                                           for t in ("<tool_call>", "</tool_call>"))]
    engine = ScriptedEngine(tokenizer=tokenizer, max_model_len=4096,
                            text='<tool_call>{"name": "get_time", "arguments": {}}</tool_call>')
    assert tokenizer.decode(tokenizer.encode(engine.text)) == '{"name": "get_time", "arguments": {}}'
    async with openai_client(engine) as client:
        message, finish_reason, _ = await ask(client, False, tools=TOOLS)
        assert calls_of(message) == [("get_time", {})] and finish_reason == "tool_calls"
        reply = await client.chat.completions.create(model=MODEL, messages=ASK)  # no tools: skipped as before
        assert reply.choices[0].message.content == '{"name": "get_time", "arguments": {}}'


def rendered_prompt(engine: ScriptedEngine) -> str:
    return engine.tokenizer.decode(engine.requests[-1].prompt_token_ids, skip_special_tokens=False)


async def test_the_embedded_template_gets_the_tool_prompt_and_tool_turns_as_text():
    engine = scripted("Sunny.")
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C and sunny"}]
    async with openai_client(engine) as client:
        reply = await client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS)
        assert reply.choices[0].message.content == "Sunny." and reply.choices[0].message.tool_calls is None
        prompt = rendered_prompt(engine)
        assert prompt.startswith("<|im_start|>system\n# Tools\n") and json.dumps(WEATHER) in prompt
        assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
                '</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n18C and sunny\n</tool_response><|im_end|>'
                in prompt)
        await client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none")
        assert json.dumps(WEATHER) in rendered_prompt(engine) and "<tool_call>" not in rendered_prompt(engine)
        await client.chat.completions.create(model=MODEL, messages=ASK)
        assert "# Tools" not in rendered_prompt(engine)


async def test_a_template_that_reads_tools_renders_them_itself():
    engine = scripted("ok")
    engine.tokenizer = copy.copy(engine.tokenizer)
    engine.tokenizer.chat_template = QWEN_LIKE
    async with openai_client(engine) as client:
        history = [*ASK, {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "noon"}]
        await client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS)
    prompt = rendered_prompt(engine)
    assert prompt.startswith("<|im_start|>system\n<tools>") and "# Tools" not in prompt
    assert '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>' in prompt  # arguments as an object
    assert "<|im_start|>tool\nnoon" in prompt


BAD_REQUESTS = [
    ({"tools": [{"type": "retrieval"}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                              "required": "city"}}}]}, "tools"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": [{"type": "function", "function": {**WEATHER["function"], "strict": True}}]}, "tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_stock"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice"),
    ({"functions": [WEATHER["function"]]}, "functions"),
    ({"function_call": "auto"}, "function_call"),
    ({"reasoning_effort": "low"}, "reasoning_effort"),
    ({"reasoning_effort": "extreme"}, "reasoning_effort"),
    ({"messages": [*ASK, {"role": "tool", "content": "18C"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}], "tools": TOOLS}, None),
]


async def test_tool_fields_it_cannot_honour_are_400s_naming_them():
    engine = scripted("ok")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=make_app(engine)), base_url="http://t") as c:
        for fields, param in BAD_REQUESTS:
            body = {"model": MODEL, "messages": ASK, **fields}
            response = await c.post("/v1/chat/completions", json=body)
            if param is None:  # an empty tool_calls list is no call: accepted
                assert response.status_code == 200, response.text
                continue
            assert response.status_code == 400, (fields, response.text)
            assert response.json()["error"]["param"].startswith(param), (fields, response.json())
        assert len(engine.requests) == 1
        strict = {**WEATHER["function"], "strict": True}
        body = {"model": MODEL, "messages": ASK, "tools": [{"type": "function", "function": strict}],
                "tool_choice": "required"}
        assert (await c.post("/v1/chat/completions", json=body)).status_code == 200  # the grammar enforces it


# ---- the embedded model, served for real ----------------------------------------------------------------


@pytest.fixture(scope="module")
def served_url(tmp_path_factory):
    from _server import running_server

    with running_server(["--dtype", "float32"], tmp_path_factory.mktemp("tools") / "serve.log") as url:
        yield url


@pytest.mark.slow
async def test_the_embedded_model_serves_tools_auto_and_none(served_url):
    """The model is too small to call tools by itself: what this proves is the plumbing: the tool
    prompt reaches it (the prompt grows by the definitions), and its replies come back whole and the
    same streamed or not."""
    async with openai.AsyncOpenAI(base_url=served_url + "/v1", api_key="none", max_retries=0, timeout=300) as c:
        plain = await c.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=ASK, max_tokens=1)
        tool_json_tokens = len(embedded_tokenizer().encode(json.dumps(TOOLS)))
        for choice in ("auto", "none"):
            replies = [await ask(c, stream, model=DEFAULT_MODEL_NAME, tools=TOOLS, tool_choice=choice, max_tokens=12,
                                 temperature=0) for stream in (False, True)]
            (message, finish_reason, _), (streamed, streamed_finish, _) = replies
            assert (message["content"], message["tool_calls"] or None) == (streamed["content"], streamed["tool_calls"])
            assert finish_reason == streamed_finish and finish_reason in ("stop", "length", "tool_calls")
            assert message["content"] or message["tool_calls"]
            if choice == "none":
                assert not message["tool_calls"]
            with_tools = await c.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=ASK, tools=TOOLS,
                                                         tool_choice=choice, max_tokens=1)
            assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens + tool_json_tokens


@pytest.mark.slow
async def test_the_embedded_model_calls_tools_when_forced(served_url):
    """Needs the engine's structured output (the grammar module): the grammar is what makes the
    small model's reply a call."""
    pytest.importorskip("tidal.engine.structured_output")
    async with openai.AsyncOpenAI(base_url=served_url + "/v1", api_key="none", max_retries=0, timeout=300) as c:
        for stream in (False, True):
            message, finish_reason, _ = await ask(c, stream, model=DEFAULT_MODEL_NAME, tools=TOOLS,
                                                  tool_choice="required", max_tokens=200, temperature=0)
            assert finish_reason == "tool_calls" and message["tool_calls"]
            for name, arguments in calls_of(message):
                assert name in ("get_weather", "get_time") and isinstance(arguments, dict)
            named = {"type": "function", "function": {"name": "get_weather"}}
            message, finish_reason, _ = await ask(c, stream, model=DEFAULT_MODEL_NAME, tools=TOOLS,
                                                  tool_choice=named, max_tokens=200, temperature=0)
            ((name, arguments),) = calls_of(message)
            assert name == "get_weather" and isinstance(arguments["city"], str) and finish_reason == "tool_calls"
