"""`n`, `best_of` and `echo` through the official `openai` client, streaming and not, against the
HTTP layer over `ScriptedEngine` (a TEST DOUBLE: scripted tokens, no model; `RoutedEngine` adds the
real router's decision). What the real engine does with them (the prompt's KV shared, seeds) is in
tests/test_sampling_e2e.py.
"""

from __future__ import annotations

import asyncio

import openai
import pytest
from _routed_engine import RoutedEngine
from test_frontend_unit import (
    BYTE_LEVEL,
    MODEL,
    ScriptedEngine,
    endless_script,
    live_server,
    make_app,
    wait_until,
)

from tidal.protocol import AddRequest, TokenDelta, TokenLogprob

WORDS = [" alpha beta", " gamma delta epsilon", " zeta", " eta theta iota kappa"]
MESSAGES = [{"role": "user", "content": "hi"}]


def seeded_script(log: list | None = None):
    """Each request's text and logprobs follow from its seed (the choices differ, and best_of has a most
    likely one: seed s has a cumulative logprob of -(s % 4)); `log` records starts and deltas in order."""

    def script(request: AddRequest):
        params = request.sampling_params
        seed = params.seed or 0
        ids = BYTE_LEVEL.encode(WORDS[seed % len(WORDS)], add_special_tokens=False)[:params.max_tokens]
        if log is not None:
            log.append(("start", request.request_id))
        logprob = -(seed % 4) / len(ids)
        for i, token_id in enumerate(ids):
            last = i == len(ids) - 1
            logprobs = None
            if params.logprobs is not None:
                logprobs = [TokenLogprob(token_id, logprob, [(token_id, logprob)][:params.logprobs])]
            if log is not None:
                log.append(("delta", request.request_id))
            yield TokenDelta(request_id=request.request_id, new_token_ids=[token_id], finished=last,
                             finish_reason="length" if last else None, logprobs=logprobs,
                             num_prompt_tokens=len(request.prompt_token_ids), num_cached_tokens=4 if i == 0 else 0)

    return script


def expected_text(seed: int, max_tokens: int = 100) -> str:
    ids = BYTE_LEVEL.encode(WORDS[seed % len(WORDS)], add_special_tokens=False)[:max_tokens]
    return BYTE_LEVEL.decode(ids)


async def _with_client(engine, body, **server_kwargs):
    async with live_server(make_app(engine, **server_kwargs)) as url, \
            openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0) as client:
        return await body(client)


async def test_chat_n_choices_not_streamed():
    engine = ScriptedEngine()
    engine.script = seeded_script()

    async def body(client):
        return await client.chat.completions.create(model=MODEL, messages=MESSAGES, n=3, seed=5)

    reply = await _with_client(engine, body)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert [c.message.content for c in reply.choices] == [expected_text(s) for s in (5, 6, 7)]
    assert all(c.finish_reason == "length" for c in reply.choices)
    ids = [r.request_id for r in engine.requests]
    assert ids == [f"{reply.id}-{i}" for i in range(3)]
    assert [r.sampling_params.seed for r in engine.requests] == [5, 6, 7]
    assert len({r.routing.session_id for r in engine.requests}) == 1  # one session: one worker
    outputs = sum(len(BYTE_LEVEL.encode(expected_text(s), add_special_tokens=False)) for s in (5, 6, 7))
    prompt = len(engine.requests[0].prompt_token_ids)
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt, outputs)  # the prompt once
    assert reply.usage.prompt_tokens_details.cached_tokens == 4


async def test_chat_n_choices_streamed_carry_their_index():
    engine = ScriptedEngine()
    engine.script = seeded_script()

    async def body(client):
        stream = await client.chat.completions.create(model=MODEL, messages=MESSAGES, n=3, seed=1, stream=True,
                                                      stream_options={"include_usage": True})
        return [chunk async for chunk in stream]

    chunks = await _with_client(engine, body)
    texts, roles, finishes, usage = {}, {}, {}, None
    for chunk in chunks:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.delta.role:
                roles[choice.index] = roles.get(choice.index, 0) + 1
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert texts == {i: expected_text(1 + i) for i in range(3)}
    assert roles == {0: 1, 1: 1, 2: 1} and finishes == {0: "length", 1: "length", 2: "length"}
    assert usage.completion_tokens == sum(len(BYTE_LEVEL.encode(expected_text(1 + i), add_special_tokens=False))
                                          for i in range(3))


async def test_completion_n_choices_streamed_and_not():
    engine = ScriptedEngine()
    engine.script = seeded_script()

    async def body(client):
        whole = await client.completions.create(model=MODEL, prompt="x", n=2, seed=2, max_tokens=3)
        stream = await client.completions.create(model=MODEL, prompt="x", n=2, seed=2, max_tokens=3, stream=True)
        texts = {}
        async for chunk in stream:
            for choice in chunk.choices:
                texts[choice.index] = texts.get(choice.index, "") + choice.text
        return whole, texts

    whole, texts = await _with_client(engine, body)
    assert [c.text for c in whole.choices] == [expected_text(2, 3), expected_text(3, 3)]
    assert texts == {0: expected_text(2, 3), 1: expected_text(3, 3)}


async def test_other_choices_start_after_the_first_choice_computed_its_prompt():
    """Choices 1..n-1 reach the engine only after choice 0's first delta: its prompt's blocks are cached."""
    log: list = []
    engine = ScriptedEngine()
    engine.script = seeded_script(log)

    async def body(client):
        return await client.chat.completions.create(model=MODEL, messages=MESSAGES, n=4, seed=0)

    reply = await _with_client(engine, body)
    first_delta = log.index(("delta", f"{reply.id}-0"))
    assert log[0] == ("start", f"{reply.id}-0")
    assert all(log.index(("start", f"{reply.id}-{i}")) > first_delta for i in (1, 2, 3))


async def test_choices_without_a_seed_and_with_the_clients_session():
    engine = RoutedEngine()
    engine.script = seeded_script()

    async def body(client):
        await client.chat.completions.create(model=MODEL, messages=MESSAGES, n=3)
        await client.chat.completions.create(model=MODEL, messages=MESSAGES, n=2, user="alice")
        return await client.chat.completions.create(model=MODEL, messages=MESSAGES, n=1, seed=9)

    single = await _with_client(engine, body)
    engine.close()
    unseeded, alice, one = engine.requests[:3], engine.requests[3:5], engine.requests[5]
    assert [r.sampling_params.seed for r in unseeded] == [None] * 3
    assert {r.routing.session_id for r in unseeded} == {unseeded[0].request_id.rsplit("-", 1)[0]}
    assert {r.routing.session_id for r in alice} == {"alice"}
    assert one.request_id == single.id and one.routing is None and one.sampling_params.seed == 9
    # the router pinned each session to one worker (choice 0's), so the others follow it
    sessions = engine.router.sessions
    assert sessions.get("alice") is not None and sessions.get(unseeded[0].routing.session_id) is not None


async def test_seed_near_the_int64_limit_wraps():
    engine = ScriptedEngine()
    engine.script = seeded_script()

    async def body(client):
        return await client.completions.create(model=MODEL, prompt="x", n=3, seed=2**63 - 2, max_tokens=2)

    await _with_client(engine, body)
    assert [r.sampling_params.seed for r in engine.requests] == [2**63 - 2, 2**63 - 1, -(2**63)]


async def test_best_of_returns_the_most_likely():
    engine = ScriptedEngine()
    engine.script = seeded_script()

    async def body(client):
        best = await client.completions.create(model=MODEL, prompt="x", best_of=4, seed=1)  # seeds 1..4
        two = await client.completions.create(model=MODEL, prompt="x", best_of=4, n=2, seed=1, logprobs=1)
        return best, two

    best, two = await _with_client(engine, body)
    # cumulative logprobs -(seed % 4): seed 4 has 0, then seed 1 (-1)
    assert [c.text for c in best.choices] == [expected_text(4, 16)] and best.choices[0].logprobs is None
    assert [c.index for c in two.choices] == [0, 1]
    assert [c.text for c in two.choices] == [expected_text(4, 16), expected_text(1, 16)]
    assert sum(two.choices[1].logprobs.token_logprobs) == pytest.approx(-1.0)
    assert all(r.sampling_params.logprobs == 0 for r in engine.requests[:4])  # asked of the engine to rank
    all_tokens = sum(min(16, len(BYTE_LEVEL.encode(WORDS[s % 4], add_special_tokens=False))) for s in (1, 2, 3, 4))
    assert best.usage.completion_tokens == all_tokens  # every sample was generated


async def test_echo_prepends_the_prompt():
    engine = ScriptedEngine()
    engine.script = seeded_script()
    prompt_ids = BYTE_LEVEL.encode("The capital", add_special_tokens=False)

    async def body(client):
        whole = await client.completions.create(model=MODEL, prompt="Say: ", echo=True, seed=0, n=2, max_tokens=2)
        ids = await client.completions.create(model=MODEL, prompt=prompt_ids, echo=True, seed=0, max_tokens=2)
        stream = await client.completions.create(model=MODEL, prompt="Say: ", echo=True, seed=0, n=2, max_tokens=2,
                                                 stream=True)
        texts = {}
        async for chunk in stream:
            for choice in chunk.choices:
                texts.setdefault(choice.index, []).append(choice.text)
        return whole, ids, texts

    whole, ids, texts = await _with_client(engine, body)
    assert [c.text for c in whole.choices] == ["Say: " + expected_text(0, 2), "Say: " + expected_text(1, 2)]
    assert ids.choices[0].text == "The capital" + expected_text(0, 2)
    assert {i: "".join(t) for i, t in texts.items()} == {0: "Say: " + expected_text(0, 2),
                                                         1: "Say: " + expected_text(1, 2)}
    assert all(t[0].startswith("Say: ") and t[0] != "Say: " for t in texts.values())  # with the first token


async def test_client_gone_aborts_every_choice():
    engine = ScriptedEngine()
    engine.script = endless_script

    async def body(client):
        stream = await client.chat.completions.create(model=MODEL, messages=MESSAGES, n=3, stream=True)
        seen = set()
        async for chunk in stream:
            seen.update(c.index for c in chunk.choices)
            if seen == {0, 1, 2}:
                break
        await stream.close()
        await wait_until(lambda: len(engine.closed_early) == 3)
        with pytest.raises(openai.APITimeoutError):
            await client.with_options(timeout=0.5).chat.completions.create(model=MODEL, messages=MESSAGES, n=2)
        await wait_until(lambda: len(engine.closed_early) == 5)

    await _with_client(engine, body)
    assert not engine.active


async def test_an_error_in_one_choice_ends_them_all():
    engine = ScriptedEngine()
    log: list = []
    seeded = seeded_script(log)

    def script(request: AddRequest):
        if request.request_id.endswith("-2"):
            raise RuntimeError("scripted failure")
        if request.request_id.endswith("-0"):
            return endless_script(request)
        return seeded(request)

    engine.script = script

    async def body(client):
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(model=MODEL, messages=MESSAGES, n=3)
        stream = await client.chat.completions.create(model=MODEL, messages=MESSAGES, n=3, stream=True)
        with pytest.raises(openai.APIError):
            async for _ in stream:
                pass
        return await client.chat.completions.create(model=MODEL, messages=MESSAGES)  # still serving

    await _with_client(engine, body)
    await wait_until(lambda: not engine.active)
    assert sum(rid.endswith("-0") for rid in engine.closed_early) == 2  # the endless choice 0, twice aborted


async def test_n_is_bounded_by_the_server():
    engine = ScriptedEngine()

    async def body(client):
        for kwargs, param in [({"n": 3}, "n"), ({"n": 0}, "n"), ({"best_of": 3}, "best_of"),
                              ({"best_of": 1, "n": 2}, "best_of")]:
            with pytest.raises(openai.BadRequestError) as caught:
                await client.completions.create(model=MODEL, prompt="x", **kwargs)
            assert caught.value.body["param"] == param
        with pytest.raises(openai.BadRequestError) as caught:
            await client.completions.create(model=MODEL, prompt="x", best_of=2, stream=True)
        assert caught.value.body["param"] == "best_of"
        return await client.completions.create(model=MODEL, prompt="x", n=2)

    reply = await _with_client(engine, body, max_n=2)
    assert len(reply.choices) == 2 and len(engine.requests) == 2


async def test_concurrent_n_requests_leave_nothing_running():
    engine = ScriptedEngine(delay_s=0.001)
    engine.script = seeded_script()

    async def body(client):
        return await asyncio.gather(*[client.chat.completions.create(model=MODEL, messages=MESSAGES, n=4, seed=i)
                                      for i in range(8)])

    replies = await _with_client(engine, body)
    assert all(len(r.choices) == 4 for r in replies) and len(engine.requests) == 32
    assert not engine.active and not engine.closed_early
