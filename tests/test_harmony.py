"""gpt-oss's harmony format (`tidal.frontend.harmony`): replies split into reasoning (analysis),
content (final, commentary preambles) and tool calls (messages to `functions.NAME`), streaming and
not, with the reasoning tokens counted; harmony chosen from the chat template.

The parser is tested on whole replies and on the same text cut at every character and at every
token boundary of a harmony tokenizer. The HTTP path runs the real app on uvicorn over
`ScriptedEngine` (test_frontend_unit: a TEST DOUBLE that replays a text as tokens) with a tiny
`tokenizers` BPE that has harmony's special tokens, wrapped in Tidal's own `Tokenizer` with a
harmony chat template written here (gpt-oss's own can't be shipped), and is read back with the
official `openai` client.
"""

from __future__ import annotations

import json

import pytest
from test_frontend_unit import MODEL, ScriptedEngine
from test_tool_calls import ASK, TOOLS, WEATHER, ask, calls_of, openai_client, rendered_prompt
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from tidal.frontend.chat_output import ChatOutputFormat
from tidal.frontend.chat_template_features import TemplateFeatures
from tidal.frontend.harmony import HarmonyParser, harmony_messages, is_harmony_template, reply_opening
from tidal.frontend.openai_types import ChatCompletionRequest
from tidal.frontend.tool_calls import ToolPlan
from tidal.tokenizer import Tokenizer

HARMONY_SPECIALS = ["<|startoftext|>", "<|endoftext|>", "<|return|>", "<|constrain|>", "<|channel|>",
                    "<|start|>", "<|end|>", "<|message|>", "<|call|>"]
HARMONY_TEMPLATE = """\
{%- set ns = namespace(last_call="") -%}
<|start|>system<|message|>Reasoning: {{ reasoning_effort | default("medium") }}
# Valid channels: analysis, commentary, final.<|end|>
{%- if tools %}<|start|>developer<|message|># Tools
namespace functions {
{%- for tool in tools %}
// {{ tool.function.description | default("") }}
type {{ tool.function.name }} = (_: {{ tool.function.parameters | tojson }}) => any;
{%- endfor %}
} // namespace functions<|end|>{% endif -%}
{%- for m in messages -%}
{%- if m.role == "assistant" and m.tool_calls -%}
{%- set call = m.tool_calls[0].function -%}
{%- set ns.last_call = call.name -%}
{%- if m.thinking %}<|start|>assistant<|channel|>analysis<|message|>{{ m.thinking }}<|end|>{% endif -%}
<|start|>assistant to=functions.{{ call.name }}<|channel|>commentary json<|message|>
{{- call.arguments | tojson }}<|call|>
{%- elif m.role == "assistant" -%}
<|start|>assistant<|channel|>final<|message|>{{ m.content }}<|end|>
{%- elif m.role == "tool" -%}
<|start|>functions.{{ ns.last_call }} to=assistant<|channel|>commentary<|message|>{{ m.content }}<|end|>
{%- else -%}
<|start|>{{ m.role }}<|message|>{{ m.content }}<|end|>
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt %}<|start|>assistant{% endif -%}"""

THINK = "<|channel|>analysis<|message|>The user asks about Paris. Weather needs a tool.<|end|>"
CALL = ('<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>'
        '{"city": "Paris", "unit": "C"}<|call|>')
ANSWER = "<|start|>assistant<|channel|>final<|message|>It is 18C in Paris <sunny>.<|return|>"
THOUGHT = "The user asks about Paris. Weather needs a tool."


@pytest.fixture(scope="module")
def harmony_tokenizer() -> Tokenizer:
    """A byte-level BPE trained on a few harmony replies, with harmony's special tokens, as Tidal's
    `Tokenizer` (eos: <|return|>, and <|call|> from the generation config)."""
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, show_progress=False, special_tokens=HARMONY_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([THINK + CALL + ANSWER, THOUGHT] * 5, trainer)
    return Tokenizer(backend, eos_token="<|return|>", eos_token_ids={backend.token_to_id("<|call|>")},
                     chat_template=HARMONY_TEMPLATE)


# ---- the parser -------------------------------------------------------------------------------------


def parse(parser: HarmonyParser, pieces: list[str]) -> tuple[str, str, list[tuple[str, str]]]:
    """(reasoning, content, [(name, arguments)]), checking the deltas' streaming shape."""
    reasoning, content, calls = "", "", {}
    for got_reasoning, parsed in [parser.feed(piece) for piece in pieces] + [parser.finish()]:
        reasoning, content = reasoning + got_reasoning, content + parsed.content
        for delta in parsed.calls:
            if delta.id is not None:
                assert delta.index == len(calls) and delta.arguments == "" and delta.id.startswith("call_")
                calls[delta.index] = [delta.name, ""]
            else:
                assert delta.name is None and delta.arguments
                calls[delta.index][1] += delta.arguments
    return reasoning, content, [tuple(call) for call in calls.values()]


WEATHER_CALL = ("get_weather", '{"city": "Paris", "unit": "C"}')
CASES = [  # (text, calls allowed, max calls, opening, (reasoning, content, calls))
    (THINK + ANSWER, True, None, None, (THOUGHT, "It is 18C in Paris <sunny>.", [])),
    # the stop tokens (<|return|>, <|call|>) are usually hidden from the text
    (THINK + ANSWER.removesuffix("<|return|>"), True, None, None,
     (THOUGHT, "It is 18C in Paris <sunny>.", [])),
    (THINK + CALL, True, None, None, (THOUGHT, "", [WEATHER_CALL])),
    (THINK + CALL.removesuffix("<|call|>"), True, None, None, (THOUGHT, "", [WEATHER_CALL])),
    # the recipient before the channel, a content type without <|constrain|>
    ("<|start|>assistant to=functions.get_time<|channel|>commentary json<|message|>{}<|call|>",
     True, None, None,
     ("", "", [("get_time", "{}")])),
    ("to=functions.get_time<|channel|>commentary json<|message|>{}", True, None, None,
     ("", "", [("get_time", "{}")])),
    # a preamble to the user on commentary, then the call
    ("<|channel|>commentary<|message|>Let me check.<|end|>" + CALL, True, None, None,
     ("", "Let me check.", [WEATHER_CALL])),
    # calls not allowed (no tools, tool_choice none): the call's body is content
    (THINK + CALL, False, None, None, (THOUGHT, '{"city": "Paris", "unit": "C"}', [])),
    # parallel_tool_calls false: the first call only
    (CALL + CALL.replace("Paris", "Rome"), True, 1, None, ("", "", [WEATHER_CALL])),
    (CALL + CALL.replace("Paris", "Rome"), True, None, None,
     ("", "", [WEATHER_CALL, ("get_weather", '{"city": "Rome", "unit": "C"}')])),
    # a built-in tool keeps its whole name
    ('<|channel|>analysis to=browser.search code<|message|>{"query": "x"}<|call|>', True, None, None,
     ("", "", [("browser.search", '{"query": "x"}')])),
    # cut by the length limit inside the reasoning, and inside a header
    ("<|channel|>analysis<|message|>Half a thou", True, None, None, ("Half a thou", "", [])),
    (THINK + "<|start|>assistant<|channel|>fin", True, None, None, (THOUGHT, "", [])),
    # the prompt opened the final message itself
    ("Just this.<|return|>", True, None, "assistant<|channel|>final", ("", "Just this.", [])),
    # no harmony at all (a model off its format, JSON that response_format forced): content as written
    ("Hello <b> there <|x", True, None, None, ("", "Hello <b> there <|x", [])),
    ('{"answer": 42}', True, None, None, ("", '{"answer": 42}', [])),
    ("", True, None, None, ("", "", [])),
]


@pytest.mark.parametrize("text,calls,max_calls,opening,expected", CASES)
def test_parser_reads_channels_wherever_the_text_is_cut(text, calls, max_calls, opening, expected):
    def run(pieces):
        return parse(HarmonyParser(calls, max_calls, opening), pieces)

    assert run([text]) == expected
    assert run(list(text)) == expected
    for cut in range(1, len(text)):
        assert run([text[:cut], text[cut:]]) == expected, cut


@pytest.mark.parametrize("text,calls,max_calls,opening,expected", CASES)
def test_parser_reads_channels_token_by_token(harmony_tokenizer, text, calls, max_calls, opening, expected):
    ids = harmony_tokenizer.encode(text, add_special_tokens=False)
    tokens = [harmony_tokenizer.decode([i], skip_special_tokens=False) for i in ids]
    assert "".join(tokens) == text
    assert parse(HarmonyParser(calls, max_calls, opening), tokens) == expected
    for boundary in range(1, len(tokens)):
        pieces = ["".join(tokens[:boundary]), "".join(tokens[boundary:])]
        assert parse(HarmonyParser(calls, max_calls, opening), pieces) == expected


def test_the_reply_parser_counts_reasoning_tokens_and_ends_in_tool_calls():
    fmt = ChatOutputFormat(harmony=lambda: HarmonyParser(calls=True))
    assert fmt.parses and {"<|channel|>", "<|message|>", "<|end|>", "<|start|>"} <= set(fmt.markers)
    parser = fmt.parser()
    pieces = ["<|channel|>", "analysis", "<|message|>", "Need", " a tool", "<|end|>", "<|start|>",
              "assistant", "<|channel|>", "commentary to=functions.get_time", "<|message|>", "{}"]
    deltas = [delta for piece in pieces for delta in parser.feed(piece, 1)]
    end, finish_reason = parser.finish("stop")
    assert finish_reason == "tool_calls" and end == []  # nothing was held back
    assert parser.reasoning_tokens == 3  # "Need", " a tool", "<|end|>": the steps fed inside the analysis
    message = parser.message()
    assert message.reasoning_content == "Need a tool" and message.content is None
    assert [(c.function.name, c.function.arguments) for c in message.tool_calls] == [("get_time", "{}")]
    assert {"reasoning_content": "Need"} in deltas
    plain = ChatOutputFormat(harmony=HarmonyParser).parser()
    plain.feed("<|channel|>final<|message|>Hi.", 4)
    assert plain.finish("stop")[1] == "stop" and plain.reasoning_tokens == 0
    assert plain.message().content == "Hi." and plain.message().reasoning_content is None


def test_harmony_is_chosen_from_the_template():
    assert is_harmony_template(HARMONY_TEMPLATE) and not is_harmony_template("{{ messages }}")
    features = TemplateFeatures.of(HARMONY_TEMPLATE)
    assert features.tool_call_format == "harmony"
    assert features.reads_tools and features.reads_tool_calls and features.reads_reasoning_effort
    req = ChatCompletionRequest.model_validate({"model": MODEL, "messages": ASK, "tools": TOOLS})
    assert ToolPlan.for_request(req, features, "auto").parser_name == "harmony"
    assert ToolPlan.for_request(req, TemplateFeatures(), "harmony").parser_name == "harmony"


def test_prompt_helpers():
    assert reply_opening("<|start|>user<|message|>hi<|end|><|start|>assistant") is None
    assert reply_opening("<|start|>assistant<|channel|>final<|message|>") == "assistant<|channel|>final"
    turns = [{"role": "assistant", "content": "", "reasoning_content": "why", "tool_calls": [{}]},
             {"role": "assistant", "content": "answer", "reasoning_content": "why"},
             {"role": "user", "content": "x"}]
    assert [m.get("thinking") for m in harmony_messages(turns)] == ["why", None, None]


def test_end_ends_a_message_not_the_reply_in_a_harmony_vocabulary(harmony_tokenizer):
    ids = {token: harmony_tokenizer.backend.token_to_id(token) for token in HARMONY_SPECIALS}
    assert ids["<|end|>"] not in harmony_tokenizer.eos_token_ids
    assert {ids["<|return|>"], ids["<|call|>"], ids["<|endoftext|>"]} <= harmony_tokenizer.eos_token_ids


# ---- through the server ------------------------------------------------------------------------------


def harmony_engine(tokenizer: Tokenizer, text: str) -> ScriptedEngine:
    return ScriptedEngine(tokenizer=tokenizer, max_model_len=4096, text=text)


async def reasoning_and_usage(client, stream: bool, **fields):
    """(reasoning_content, content, usage) the same way for both kinds."""
    if not stream:
        reply = await client.chat.completions.create(model=MODEL, messages=ASK, **fields)
        message = reply.choices[0].message
        return message.reasoning_content, message.content, reply.usage
    chunks = [c async for c in await client.chat.completions.create(
        model=MODEL, messages=ASK, stream=True, stream_options={"include_usage": True}, **fields)]
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant"
    assert sum(bool(getattr(d, "reasoning_content", None)) for d in deltas) > 1  # it streams as it comes
    reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    return reasoning or None, "".join(d.content or "" for d in deltas), chunks[-1].usage


@pytest.mark.parametrize("stream", [False, True])
async def test_reasoning_and_answer_through_the_server(harmony_tokenizer, stream):
    engine = harmony_engine(harmony_tokenizer, THINK + ANSWER)
    async with openai_client(engine) as client:  # harmony from the template: no parser configured
        reasoning, content, usage = await reasoning_and_usage(client, stream, reasoning_effort="high")
        assert reasoning == THOUGHT and content == "It is 18C in Paris <sunny>."
        thought_tokens = len(harmony_tokenizer.encode(THOUGHT, add_special_tokens=False))
        assert thought_tokens <= usage.completion_tokens_details.reasoning_tokens < usage.completion_tokens
        prompt = rendered_prompt(engine)
        assert prompt.startswith("<|start|>system<|message|>Reasoning: high\n")
        assert prompt.endswith("<|start|>assistant")
    assert not engine.active


@pytest.mark.parametrize("stream", [False, True])
async def test_a_tool_call_through_the_server(harmony_tokenizer, stream):
    engine = harmony_engine(harmony_tokenizer, THINK + CALL)
    async with openai_client(engine) as client:
        message, finish_reason, deltas = await ask(client, stream, tools=TOOLS)
        assert finish_reason == "tool_calls" and message["content"] is None
        assert calls_of(message) == [("get_weather", {"city": "Paris", "unit": "C"})]
        if stream:
            assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == THOUGHT
        else:
            assert message["reasoning_content"] == THOUGHT
        prompt = rendered_prompt(engine)
        assert "namespace functions {" in prompt and "type get_weather" in prompt
        message, finish_reason, _ = await ask(client, stream, tools=TOOLS, tool_choice="none")
        assert finish_reason == "stop" and not message["tool_calls"]
        assert message["content"] == '{"city": "Paris", "unit": "C"}'


async def test_the_next_turn_renders_the_call_its_reasoning_and_the_result(harmony_tokenizer):
    engine = harmony_engine(harmony_tokenizer, ANSWER)
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    turn = {"role": "assistant", "content": None, "reasoning_content": THOUGHT, "tool_calls": [call]}
    history = [*ASK, turn, {"role": "tool", "tool_call_id": "call_1", "content": "18C"}]
    async with openai_client(engine) as client:
        reply = await client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER])
    assert reply.choices[0].message.content == "It is 18C in Paris <sunny>."
    assert reply.choices[0].finish_reason == "stop"
    assert (f"<|start|>assistant<|channel|>analysis<|message|>{THOUGHT}<|end|>"
            "<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>"
            '{"city": "Paris"}<|call|>'
            "<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>18C<|end|>"
            "<|start|>assistant") in rendered_prompt(engine)


async def test_forced_choices_read_the_json_the_grammar_forces(harmony_tokenizer):
    engine = harmony_engine(harmony_tokenizer, '[{"name": "get_weather", "parameters": {"city": "Oslo"}}]')
    async with openai_client(engine) as client:
        message, finish_reason, _ = await ask(client, False, tools=TOOLS, tool_choice="required")
    assert calls_of(message) == [("get_weather", {"city": "Oslo"})] and finish_reason == "tool_calls"
    assert json.loads(engine.requests[-1].sampling_params.structured.spec)["minItems"] == 1
