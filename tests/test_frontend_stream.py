"""The lean per-token path: streamed chunk bytes equal the pydantic models' JSON; a stream that
fell behind its worker gets every ready delta merged into one."""

from __future__ import annotations

import asyncio
import json

import pytest

from tidal.frontend.openai_types import (ChatChoiceLogprobs, ChatChunkEncoder, ChatCompletionChunk,
                                         ChatCompletionChunkChoice, ChatTokenLogprob, ChatTopLogprob,
                                         CompletionChoice, CompletionChunkEncoder, CompletionLogprobs,
                                         CompletionResponse)
from tidal.frontend.serving import sse_event
from tidal.protocol import AddRequest, SamplingParams, TokenDelta, TokenLogprob, WorkerInfo
from tidal.runtime.worker_client import WorkerClient, coalesce

TEXTS = ["", "hello", " world", 'quote " and \\ backslash', "line\nbreak\ttab\r\b\f",
         "".join(chr(c) for c in range(32)) + "\x7f", "héllo wörld", "日本語", "emoji 🙂👍🏽",
         "\u2028\u2029", "</script>", "\ufffd", "a" * 300]


def _chat_model_bytes(request_id, created, model, include_usage, content, role, logprobs, finish_reason, index=0):
    delta = {}
    if role:
        delta["role"] = "assistant"
    if content is not None:
        delta["content"] = content
    chunk = ChatCompletionChunk(id=request_id, created=created, model=model, choices=[
        ChatCompletionChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish_reason)])
    return sse_event(chunk.model_dump_json(exclude=None if include_usage else {"usage"}))


def _chat_logprobs() -> ChatChoiceLogprobs:
    top = [ChatTopLogprob(token="a\"b", logprob=-0.25, bytes=[97, 34, 98]),
           ChatTopLogprob(token="bytes:\\xe2", logprob=-9999.0, bytes=[226])]
    return ChatChoiceLogprobs(content=[ChatTokenLogprob(token="é", logprob=-1e-7, bytes=[195, 169],
                                                        top_logprobs=top)])


@pytest.mark.parametrize("include_usage, index", [(False, 0), (True, 0), (False, 3)])
@pytest.mark.parametrize("text", TEXTS)
def test_chat_chunk_bytes_equal_the_model(text, include_usage, index):
    encoder = ChatChunkEncoder("chatcmpl-1\"x", 1733456789, "my/model é", include_usage, index=index)
    for role, content, logprobs, finish_reason in [
            (True, text, None, None), (False, text, None, None), (False, None, None, "stop"),
            (False, text, _chat_logprobs(), "length"), (True, text, None, "stop"), (False, None, None, None)]:
        got = encoder.chunk(content, role=role, logprobs=logprobs, finish_reason=finish_reason)
        want = _chat_model_bytes("chatcmpl-1\"x", 1733456789, "my/model é", include_usage, content, role,
                                 logprobs, finish_reason, index)
        assert got == want
        assert json.loads(got[len(b"data: "):]) == json.loads(want[len(b"data: "):])


@pytest.mark.parametrize("include_usage, index", [(False, 0), (True, 0), (False, 3)])
@pytest.mark.parametrize("text", TEXTS)
def test_chat_delta_chunk_bytes_equal_the_model(text, include_usage, index):
    """The chunks of parsed replies (reasoning, tool calls) are the model's bytes too."""
    encoder = ChatChunkEncoder("chatcmpl-3", 1733456789, "m", include_usage, index=index)
    first_call = {"index": 0, "id": "call_0a", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
    deltas = [{"role": "assistant", "content": text}, {"reasoning_content": text}, {"role": "assistant"},
              {"reasoning_content": text, "content": text}, {"tool_calls": [first_call]},
              {"role": "assistant", "tool_calls": [first_call]}, {},
              {"tool_calls": [{"index": 1, "function": {"arguments": text}}]}]
    for delta in deltas:
        for logprobs, finish_reason in [(None, None), (_chat_logprobs(), "tool_calls")]:
            got = encoder.delta_chunk(delta, logprobs=logprobs, finish_reason=finish_reason)
            chunk = ChatCompletionChunk(id="chatcmpl-3", created=1733456789, model="m", choices=[
                ChatCompletionChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish_reason)])
            assert got == sse_event(chunk.model_dump_json(exclude=None if include_usage else {"usage"}))


@pytest.mark.parametrize("include_usage, index", [(False, 0), (True, 0), (False, 3)])
@pytest.mark.parametrize("text", TEXTS)
def test_completion_chunk_bytes_equal_the_model(text, include_usage, index):
    encoder = CompletionChunkEncoder("cmpl-2", 17, "sim", include_usage, index=index)
    logprobs = CompletionLogprobs(tokens=["a", " é"], token_logprobs=[-0.5, -1.25],
                                  top_logprobs=[{"a": -0.5}, {" é": -1.25, "x": -3.0}], text_offset=[0, 1])
    for chunk_logprobs, finish_reason in [(None, None), (logprobs, None), (None, "stop"), (logprobs, "length")]:
        got = encoder.chunk(text, logprobs=chunk_logprobs, finish_reason=finish_reason)
        model = CompletionResponse(id="cmpl-2", created=17, model="sim", choices=[
            CompletionChoice(index=index, text=text, logprobs=chunk_logprobs, finish_reason=finish_reason)])
        assert got == sse_event(model.model_dump_json(exclude=None if include_usage else {"usage"}))


def _delta(ids, **kw) -> TokenDelta:
    return TokenDelta(request_id="r", new_token_ids=list(ids), **kw)


def test_coalesce_merges_plain_deltas_up_to_the_finished_one():
    merged = coalesce([_delta([1], queue_s=0.5, num_cached_tokens=4), _delta([2]), _delta([3], num_cached_tokens=4),
                       _delta([4], finished=True, finish_reason="length")])
    assert merged == [_delta([1, 2, 3, 4], queue_s=0.5, num_cached_tokens=4, finished=True,
                             finish_reason="length")]
    assert coalesce([_delta([1])]) == [_delta([1])]


def test_coalesce_merges_logprobs_in_order():
    lp = [TokenLogprob(token_id=i, logprob=-float(i), top=[]) for i in range(3)]
    merged = coalesce([_delta([0], logprobs=lp[:1]), _delta([1, 2], logprobs=lp[1:])])
    assert merged == [_delta([0, 1, 2], logprobs=lp)]


def test_coalesce_keeps_deltas_that_carry_more_than_tokens_apart():
    error = _delta([], finished=True, finish_reason="error", error="boom")
    kv_first = _delta([5], queue_s=0.1)
    cases = [
        [_delta([1]), error],  # the tokens before an error still reach the client
        [_delta([1]), _delta([2], finish_reason="error", finished=True)],
        [_delta([1], finished=True, finish_reason="stop"), _delta([2])],  # nothing after the last one
        [_delta([1]), kv_first],  # a later first-step timing would be lost
        [_delta([1]), _delta([2], kv_transfer_s=0.2)],
        [_delta([1]), _delta([2], logprobs=[TokenLogprob(token_id=2, logprob=-1.0, top=[])])],
    ]
    for items in cases:
        assert coalesce(items) == items


async def test_a_stream_behind_its_worker_gets_one_merged_delta():
    client = WorkerClient(WorkerInfo(worker_id="w0", role="both", request_addr="ipc:///tmp/tidal-test-unused",
                                     event_addr="ipc:///tmp/tidal-test-unused-events"))
    client._send = lambda msg: None  # no worker: deltas are delivered by hand below
    try:
        request = AddRequest(request_id="r", prompt_token_ids=[1, 2], sampling_params=SamplingParams(max_tokens=4))
        stream = client.generate(request)
        first = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0)
        mailbox = client._queues["r"]
        mailbox.put_nowait(_delta([7]))
        assert (await first).new_token_ids == [7]
        for token in (8, 9):  # the stream is busy elsewhere: two steps arrive meanwhile
            mailbox.put_nowait(_delta([token]))
        mailbox.put_nowait(_delta([10], finished=True, finish_reason="length"))
        rest = [delta async for delta in stream]
        assert rest == [_delta([8, 9, 10], finished=True, finish_reason="length")]
        assert client.num_open_requests == 0
    finally:
        await client.close()
