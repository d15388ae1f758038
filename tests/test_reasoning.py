"""Reasoning output: <think>...</think> split into `reasoning_content`, streaming and not, with the
reasoning tokens counted in usage; `reasoning_effort` honoured only where the template reads it.

The parser is tested on text cut at every place; the HTTP path replays a thinking model's reply
through `ScriptedEngine` (a TEST DOUBLE, see test_frontend_unit) and reads it with the official
`openai` client (the embedded model does not think).
"""

from __future__ import annotations

import copy
import random

import httpx
import pytest
from test_frontend_unit import MODEL, make_app
from test_tool_calls import ASK, TOOLS, ask, calls_of, cuts, openai_client, rendered_prompt, scripted

from tidal.frontend.chat_output import ChatOutputFormat
from tidal.frontend.reasoning import ReasoningParser, starts_in_reasoning
from tidal.frontend.tool_parsers import HermesToolParser

THOUGHT = "<think>\nThe user asks about Paris. It is in France.\n</think>\n\nParis is in France."


def split(parser: ReasoningParser, pieces: list[str]) -> tuple[str, str]:
    reasoning, content = "", ""
    for r, c in [parser.feed(piece) for piece in pieces] + [parser.finish()]:
        reasoning, content = reasoning + r, content + c
    return reasoning, content


CASES = [  # (text, the reply begins in reasoning, reasoning, content)
    (THOUGHT, False, "The user asks about Paris. It is in France.\n", "Paris is in France."),
    ("Paris is in France.", False, "", "Paris is in France."),  # Qwen3 with thinking turned off
    ("<thinking> is not the tag", False, "", "<thinking> is not the tag"),
    ("2 < 3, so </think> is text here", False, "", "2 < 3, so </think> is text here"),
    ("Thinking without a tag.</think>Answer.", True, "Thinking without a tag.", "Answer."),  # R1 / opened by the prompt
    (THOUGHT, True, "The user asks about Paris. It is in France.\n", "Paris is in France."),
    ("<think>cut off before the end </thi", False, "cut off before the end </thi", ""),
    ("<think></think>", False, "", ""),
]


@pytest.mark.parametrize("text,in_reasoning,reasoning,content", CASES)
def test_reasoning_parser_wherever_the_text_is_cut(text, in_reasoning, reasoning, content):
    rng = random.Random(0)
    for pieces in [[text], list(text)] + [cuts(text, rng, 4) for _ in range(8)]:
        assert split(ReasoningParser(in_reasoning), pieces) == (reasoning, content)


def test_where_a_reply_begins():
    assert starts_in_reasoning("deepseek_r1", "<｜Assistant｜>")
    assert starts_in_reasoning("qwen3", "<|im_start|>assistant\n<think>\n")
    assert not starts_in_reasoning("qwen3", "<|im_start|>assistant\n")
    assert not starts_in_reasoning("qwen3", "<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_tool_calls_are_read_from_the_answer_only():
    text = ('<think>I could write <tool_call>{"name": "get_time", "arguments": {}}</tool_call> here.</think>'
            '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>')
    fmt = ChatOutputFormat(tools=HermesToolParser, reasoning="qwen3")
    for pieces in ([text], list(text)):
        parser = fmt.parser()
        for piece in pieces:
            parser.feed(piece, 1)
        _, finish_reason = parser.finish("stop")
        message = parser.message()
        assert finish_reason == "tool_calls" and message.content is None
        assert message.reasoning_content.startswith("I could write <tool_call>")
        assert [c.function.name for c in message.tool_calls] == ["get_weather"]


def test_reasoning_tokens_are_the_steps_inside_the_reasoning():
    parser = ChatOutputFormat(reasoning="qwen3").parser()
    for piece in ["<think>", "a", " b", "</think>", "\n\n", "Answer", "."]:
        parser.feed(piece, 1)
    parser.finish("stop")
    assert parser.reasoning_tokens == 3  # a, b, </think>
    plain = ChatOutputFormat(reasoning="qwen3").parser()
    plain.feed("No thinking.", 3)
    plain.finish("stop")
    assert plain.reasoning_tokens == 0 and plain.message().reasoning_content is None
    assert ChatOutputFormat().parser().reasoning_tokens is None


@pytest.mark.parametrize("stream", [False, True])
async def test_reasoning_content_through_the_server(stream):
    engine = scripted(THOUGHT)
    async with openai_client(engine, reasoning_parser="qwen3") as client:
        if stream:
            chunks = [c async for c in await client.chat.completions.create(
                model=MODEL, messages=ASK, stream=True, stream_options={"include_usage": True})]
            deltas = [c.choices[0].delta for c in chunks if c.choices]
            reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
            content = "".join(d.content or "" for d in deltas)
            assert any(getattr(d, "reasoning_content", None) for d in deltas[:3])  # it streams as it comes
            usage = chunks[-1].usage
        else:
            reply = await client.chat.completions.create(model=MODEL, messages=ASK)
            message = reply.choices[0].message
            reasoning, content, usage = message.reasoning_content, message.content, reply.usage
        assert reasoning == "The user asks about Paris. It is in France.\n"
        assert content == "Paris is in France."
        thought_tokens = len(engine.tokenizer.encode(THOUGHT.split("</think>")[0], add_special_tokens=False))
        assert thought_tokens <= usage.completion_tokens_details.reasoning_tokens < usage.completion_tokens


@pytest.mark.parametrize("stream", [False, True])
async def test_a_thinking_model_calling_a_tool(stream):
    engine = scripted('<think>Weather needs a tool.</think>\n<tool_call>\n{"name": "get_weather", '
                      '"arguments": {"city": "Paris"}}\n</tool_call>')
    async with openai_client(engine, reasoning_parser="deepseek_r1") as client:
        message, finish_reason, _ = await ask(client, stream, tools=TOOLS)
        assert calls_of(message) == [("get_weather", {"city": "Paris"})] and finish_reason == "tool_calls"
        assert message["content"] is None


async def test_without_a_reasoning_parser_the_reply_is_content():
    engine = scripted(THOUGHT)
    async with openai_client(engine) as client:
        reply = await client.chat.completions.create(model=MODEL, messages=ASK)
    assert reply.choices[0].message.content == THOUGHT
    assert getattr(reply.choices[0].message, "reasoning_content", None) is None
    assert reply.usage.completion_tokens_details is None


async def test_reasoning_effort_reaches_a_template_that_reads_it():
    engine = scripted("ok")
    engine.tokenizer = copy.copy(engine.tokenizer)
    engine.tokenizer.chat_template = ("<|im_start|>system\nReasoning: {{ reasoning_effort | default('medium') }}"
                                      "<|im_end|>\n{% for m in messages %}{{ m.content }}{% endfor %}")
    async with openai_client(engine) as client:
        await client.chat.completions.create(model=MODEL, messages=ASK, reasoning_effort="low")
        assert "Reasoning: low" in rendered_prompt(engine)
        await client.chat.completions.create(model=MODEL, messages=ASK)
        assert "Reasoning: medium" in rendered_prompt(engine)


async def test_reasoning_effort_is_a_400_where_the_template_ignores_it():
    engine = scripted("ok")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=make_app(engine)), base_url="http://t") as c:
        response = await c.post("/v1/chat/completions", json={"model": MODEL, "messages": ASK,
                                                               "reasoning_effort": "high"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "reasoning_effort"
    assert not engine.requests
