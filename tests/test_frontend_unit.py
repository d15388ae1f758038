"""Unit tests of the HTTP layer (tidal/frontend) against a scripted test double of the engine.

`ScriptedEngine` below is a TEST DOUBLE of `EngineClient`: it runs no model, it replays token
ids chosen by each test and records what reached it (requests, early closes = aborts). The
tokenizer is a small byte-level BPE trained here (GPT-2 style, like SmolLM2's), plus the real
embedded tokenizer when `tidal.tokenizer` is importable. What the real engine does is covered
by tests/test_server_e2e.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import random
from collections.abc import AsyncIterator, Callable, Iterable

import httpx
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tidal.config import ServerConfig
from tidal.frontend.app import build_app, make_http_server
from tidal.frontend.detokenizer import (IncrementalDetokenizer, OutputAssembler,
                                        StopStringMatcher, TokenTextTable)
from tidal.errors import EngineDeadError, OverloadedError
from tidal.frontend.serving import SSEResponse
from tidal.protocol import AddRequest, EngineStats, TokenDelta, TokenLogprob

MODEL = "test-model"
CORPUS = [
    "The capital of France is Paris. The capital of Japan is Tokyo.",
    "Hello world! How are you today? I am fine, thank you.",
    "Ünïcödé: naïve café, 你好世界, 日本語, emoji 😀🎉👍 and ∑ ≠ ∞.",
    "<|user|> what is two plus two? <|assistant|> four.",
]
TEXTS = [
    "The capital of France is Paris.",
    "你好世界 and 日本語 😀🎉 done",
    "naïve café ∑≠∞ 👍👍",
    "a" * 50 + " 😀 " + "b" * 10,
]


# ---------------------------------------------------------------------------------------------
# tokenizers


class TokenizerAdapter:
    """A `tokenizers.Tokenizer` behind the interface tidal.tokenizer provides."""

    def __init__(self, tokenizer: Tokenizer, eos_token: str = "<eos>") -> None:
        self._tok = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()
        self.eos_token_id = tokenizer.token_to_id(eos_token)
        self.eos_token_ids = {self.eos_token_id}
        self.bos_token_id = None
        self.all_special_ids = [self.eos_token_id]
        self.chat_template = "test"
        self.decode_calls: list[int] = []

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        self.decode_calls.append(len(ids))
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self._tok.id_to_token(i) for i in ids]

    def apply_chat_template(self, messages, add_generation_prompt=True, tools=None, **kwargs):
        if kwargs.get("fail"):
            raise ValueError("template refused the conversation")
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


def byte_level_bpe() -> TokenizerAdapter:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, show_progress=False, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 10, trainer)
    return TokenizerAdapter(tok)


def sentencepiece_style_bpe() -> TokenizerAdapter:
    """Llama-2 style: '▁' for spaces, byte fallback, and a decoder that strips the leading
    space of every decode (the case the detokenizer's prefix window exists for)."""
    vocab = {"<eos>": 0}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in ["▁", *"abcdefghijklmnopqrstuvwxyzTHP.,!", "▁t", "▁th", "▁the", "▁c", "▁ca",
                  "ap", "it", "al", "▁P", "ar", "is"]:
        vocab.setdefault(piece, len(vocab))
    merges = [("▁", "t"), ("▁t", "h"), ("▁th", "e"), ("▁", "c"), ("▁c", "a"), ("a", "p"),
              ("i", "t"), ("a", "l"), ("▁", "P"), ("a", "r"), ("i", "s")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<eos>"])
    return TokenizerAdapter(tok)


@functools.cache
def embedded_tokenizer():
    try:
        from tidal.tokenizer import load_tokenizer
    except ImportError:
        return None
    return load_tokenizer(None)


BYTE_LEVEL = byte_level_bpe()
TOKENIZER_FACTORIES = {"byte_level": lambda: BYTE_LEVEL, "sentencepiece": sentencepiece_style_bpe,
                       "embedded": embedded_tokenizer}


@pytest.fixture(params=list(TOKENIZER_FACTORIES))
def any_tokenizer(request):
    tokenizer = TOKENIZER_FACTORIES[request.param]()
    if tokenizer is None:
        pytest.skip("tidal.tokenizer is not available yet")
    return tokenizer


# ---------------------------------------------------------------------------------------------
# the engine test double


Script = Callable[[AddRequest], Iterable[TokenDelta]]


class ScriptedEngine:
    """TEST DOUBLE of EngineClient (not an engine): yields scripted deltas for each request."""

    def __init__(self, tokenizer: TokenizerAdapter = BYTE_LEVEL, max_model_len: int = 256,
                 text: str = "The capital of France is Paris.", delay_s: float = 0.0) -> None:
        self.max_model_len = max_model_len
        self.tokenizer = tokenizer
        self.text = text
        self.delay_s = delay_s
        self.healthy = True
        self.script: Script = self.default_script
        self.requests: list[AddRequest] = []
        self.active: set[str] = set()
        self.closed_early: list[str] = []
        self.fail_with: BaseException | None = None
        self.stats_value = EngineStats(num_running=1, num_waiting=2, kv_blocks_used=3,
                                       kv_blocks_total=40, prefix_cache_hit_tokens=0,
                                       prompt_tokens=0, generation_tokens=0)

    def default_script(self, request: AddRequest) -> list[TokenDelta]:
        """The scripted text one token per delta; "length" at max_tokens, else eos + "stop"."""
        params = request.sampling_params
        ids = self.tokenizer.encode(self.text, add_special_tokens=False)
        ids = ids + [self.tokenizer.eos_token_id]
        if params.ignore_eos:
            ids = (ids * (params.max_tokens // len(ids) + 1))
        ids = ids[:params.max_tokens]
        deltas = []
        for i, token_id in enumerate(ids):
            last = i == len(ids) - 1
            reason = None
            if token_id == self.tokenizer.eos_token_id and not params.ignore_eos:
                last, reason = True, "stop"
            elif last:
                reason = "length"
            logprobs = None
            if params.logprobs is not None:
                top = [(token_id, -0.5)] + [((token_id + k) % 50, -1.0 - k)
                                            for k in range(1, params.logprobs)]
                logprobs = [TokenLogprob(token_id, -0.5, top[:params.logprobs])]
            deltas.append(TokenDelta(request_id=request.request_id, new_token_ids=[token_id],
                                     finished=last, finish_reason=reason, logprobs=logprobs,
                                     num_prompt_tokens=len(request.prompt_token_ids),
                                     num_cached_tokens=8 if i == 0 else 0))
            if last:
                break
        return deltas

    async def generate(self, request: AddRequest) -> AsyncIterator[TokenDelta]:
        self.requests.append(request)
        if self.fail_with is not None:
            raise self.fail_with
        self.active.add(request.request_id)
        finished = False
        try:
            for delta in self.script(request):
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                yield delta
                if delta.finished:
                    finished = True
                    return
        finally:
            self.active.discard(request.request_id)
            if not finished:
                self.closed_early.append(request.request_id)

    async def abort(self, request_id: str) -> None:
        pass

    def stats(self) -> EngineStats | None:
        return self.stats_value

    def is_healthy(self) -> bool:
        return self.healthy


def endless_script(request: AddRequest):
    """Tokens forever (until the frontend closes the stream)."""
    i = 0
    while True:
        yield TokenDelta(request_id=request.request_id, new_token_ids=[100 + i % 50])
        i += 1


@pytest.fixture
def engine() -> ScriptedEngine:
    return ScriptedEngine()


def make_app(engine: ScriptedEngine, **server_kwargs):
    return build_app(engine, engine.tokenizer, MODEL, ServerConfig(**server_kwargs))


@pytest.fixture
async def client(engine):
    transport = httpx.ASGITransport(app=make_app(engine))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


@contextlib.asynccontextmanager
async def live_server(app) -> AsyncIterator[str]:
    """The app on a real uvicorn on a free port, in this event loop."""
    server = make_http_server(app, ServerConfig(port=0, log_level="warning"))
    server.capture_signals = contextlib.nullcontext  # leave pytest's signal handlers alone
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), "uvicorn failed to start"
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


async def wait_until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def chat_body(**kwargs) -> dict:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "What is the capital?"}]}
    body.update(kwargs)
    return body


def parse_sse(text: str) -> list:
    assert text.endswith("data: [DONE]\n\n")
    events = text.split("\n\n")
    assert events[-1] == ""
    payloads = []
    for event in events[:-1]:
        assert event.startswith("data: "), event
        data = event[len("data: "):]
        payloads.append(data if data == "[DONE]" else json.loads(data))
    assert payloads[-1] == "[DONE]" and "[DONE]" not in payloads[:-1]
    return payloads[:-1]


def of_model(name: str, **labels: str) -> str:
    """A request metric's sample name: labelled with the served model, then `labels`."""
    pairs = ",".join([f'model_name="{MODEL}"', *(f'{k}="{v}"' for k, v in labels.items())])
    return f"{name}{{{pairs}}}"


def metric_value(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in metrics")


# ---------------------------------------------------------------------------------------------
# detokenizer


def detokenize_stepwise(tokenizer, prompt_ids, output_ids, step_sizes=None):
    detok = IncrementalDetokenizer(tokenizer, prompt_ids)
    pieces = []
    i = 0
    rng = random.Random(0)
    while i < len(output_ids):
        n = 1 if step_sizes is None else rng.choice(step_sizes)
        pieces.append(detok.add_many(output_ids[i:i + n]))
        i += n
    pieces.append(detok.flush())
    return pieces


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("step_sizes", [None, [1, 2, 3, 5]])
def test_detokenizer_matches_full_decode(any_tokenizer, text, step_sizes):
    prompt_ids = any_tokenizer.encode("Say something:", add_special_tokens=False)
    output_ids = any_tokenizer.encode(" " + text, add_special_tokens=False)
    pieces = detokenize_stepwise(any_tokenizer, prompt_ids, output_ids, step_sizes)
    prompt_text = any_tokenizer.decode(prompt_ids)
    expected = any_tokenizer.decode(prompt_ids + output_ids)[len(prompt_text):]
    assert "".join(pieces) == expected
    assert not any("\ufffd" in p for p in pieces), pieces  # no partial characters streamed


def test_detokenizer_holds_split_multibyte_characters():
    tok = BYTE_LEVEL
    ids = tok.encode("😀", add_special_tokens=False)
    assert len(ids) > 1, "the test needs an emoji split over several byte tokens"
    detok = IncrementalDetokenizer(tok, [])
    emitted = [detok.add(t) for t in ids]
    assert emitted[:-1] == [""] * (len(ids) - 1)
    assert emitted[-1] == "😀"


def test_detokenizer_flushes_invalid_bytes_at_the_end():
    tok = BYTE_LEVEL
    lead_byte = tok.encode("😀", add_special_tokens=False)[0]  # a lone, incomplete byte
    detok = IncrementalDetokenizer(tok, [])
    assert detok.add(tok.encode("ok", add_special_tokens=False)[0]) != ""
    assert detok.add(lead_byte) == ""
    assert detok.flush() == "\ufffd"


def test_detokenizer_work_per_token_is_bounded():
    tok = TokenizerAdapter(BYTE_LEVEL._tok)
    ids = tok.encode(" ".join(TEXTS) * 20, add_special_tokens=False)
    assert len(ids) > 500
    detok = IncrementalDetokenizer(tok, ids[:10])
    tok.decode_calls.clear()
    for t in ids:
        detok.add(t)
    assert max(tok.decode_calls) <= 10  # a small window, never the whole output
    assert sum(tok.decode_calls) <= 6 * len(ids)


def test_detokenizer_skips_special_tokens():
    tok = BYTE_LEVEL
    ids = tok.encode("Hello", add_special_tokens=False) + [tok.eos_token_id]
    assert "".join(detokenize_stepwise(tok, [], ids)) == "Hello"


def test_token_text_table(any_tokenizer):
    table = TokenTextTable(any_tokenizer)
    hello = any_tokenizer.encode(" Hello world", add_special_tokens=False)
    assert "".join(table.text(t) for t in hello).strip() == "Hello world"
    partial = any_tokenizer.encode("😀", add_special_tokens=False)
    raw = b"".join(bytes(table.text_and_bytes(t)[1]) for t in partial)
    assert raw.decode().strip() == "😀"
    if len(partial) > 1:
        assert any(table.text(t).startswith("bytes:\\x") for t in partial)


# ---------------------------------------------------------------------------------------------
# stop strings


def feed_all(matcher: StopStringMatcher, chunks: list[str]) -> tuple[list[str], bool]:
    out = []
    for i, chunk in enumerate(chunks):
        text, stopped = matcher.feed(chunk, final=i == len(chunks) - 1)
        out.append(text)
        if stopped:
            return out, True
    return out, False


def test_stop_string_split_across_chunks():
    out, stopped = feed_all(StopStringMatcher(["o w"]), ["Hel", "lo", " wo", "rld"])
    assert stopped and "".join(out) == "Hell"
    out, stopped = feed_all(StopStringMatcher(["o w"], include_stop_str_in_output=True),
                            ["Hel", "lo", " wo", "rld"])
    assert stopped and "".join(out) == "Hello w"


def test_stop_string_holdback_and_release_at_end():
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("abcST") == ("ab", False)  # "cST" could start "STOP"
    assert matcher.feed("x") == ("c", False)
    assert matcher.feed("yz", final=True) == ("STxyz", False)


def test_earliest_stop_string_wins():
    matcher = StopStringMatcher(["world", "lo"])
    assert matcher.feed("hello world", final=False) == ("hel", True)


def test_no_stop_strings_passes_text_through():
    matcher = StopStringMatcher(["", ""])
    assert matcher.feed("abc") == ("abc", False)


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet="abc d", max_size=40), stop=st.text(alphabet="abc d", min_size=1,
                                                                 max_size=4),
       cuts=st.lists(st.integers(0, 40), max_size=8), include=st.booleans())
def test_stop_string_streaming_equals_whole_text(text, stop, cuts, include):
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    chunks = [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)] or [""]
    out, stopped = feed_all(StopStringMatcher([stop], include), chunks)
    streamed = "".join(out)
    i = text.find(stop)
    if i == -1:
        assert not stopped and streamed == text
    else:
        assert stopped and streamed == text[:i + (len(stop) if include else 0)]
    for k in range(len(out)):  # nothing streamed is ever taken back
        assert streamed.startswith("".join(out[:k + 1]))


def test_assembler_stops_at_the_token_that_completes_the_stop_string():
    tok = BYTE_LEVEL
    ids = tok.encode("The capital of France is Paris.", add_special_tokens=False)
    assembler = OutputAssembler(tok, [], stop=["France"])
    out = assembler.add(ids)
    assert out.stopped and out.text == "The capital of "
    consumed = tok.decode(ids[:out.num_tokens])
    assert "France" in consumed and "France" not in tok.decode(ids[:out.num_tokens - 1])


def test_assembler_hides_stop_token_text():
    tok = BYTE_LEVEL
    ids = tok.encode("Paris.", add_special_tokens=False)
    assembler = OutputAssembler(tok, [], hidden_token_ids=[ids[-1]])
    text = assembler.add(ids[:-1]).text + assembler.add(ids[-1:], True, "stop").text
    assert text == tok.decode(ids[:-1])
    length = OutputAssembler(tok, [], hidden_token_ids=[ids[-1]])
    assert length.add(ids, True, "length").text == "Paris."  # only a "stop" finish hides it


# ---------------------------------------------------------------------------------------------
# requests -> SamplingParams


async def test_chat_maps_fields_to_sampling_params(client, engine):
    r = await client.post("/v1/chat/completions", json=chat_body(
        temperature=0.5, top_p=0.9, top_k=-1, min_p=0.1, seed=7, stop="xyz",
        stop_token_ids=[5], ignore_eos=True, min_tokens=2, max_completion_tokens=9,
        logprobs=True, include_stop_str_in_output=True, frequency_penalty=0.5, presence_penalty=-1.0,
        repetition_penalty=1.2, logit_bias={"7": -100, "3": 2.5}, user="u"))
    assert r.status_code == 200, r.text
    (request,) = engine.requests
    p = request.sampling_params
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.seed) == (0.5, 0.9, 0, 0.1, 7)
    assert p.stop == ("xyz",) and p.stop_token_ids == (5,)
    assert p.ignore_eos and p.min_tokens == 2 and p.max_tokens == 9
    assert p.logprobs == 0 and p.include_stop_str_in_output
    assert (p.frequency_penalty, p.presence_penalty, p.repetition_penalty) == (0.5, -1.0, 1.2)
    assert p.logit_bias == ((3, 2.5), (7, -100.0))
    assert (p.frequency_penalty, p.presence_penalty, p.repetition_penalty) == (0.5, -1.0, 1.2)
    assert p.logit_bias == ((3, 2.5), (7, -100.0))
    assert request.request_id.startswith("chatcmpl-") and request.arrival_time > 0
    assert request.prompt_token_ids == BYTE_LEVEL.encode(
        "<user>What is the capital?\n<assistant>", add_special_tokens=False)


async def test_defaults_and_max_tokens(client, engine):
    r = await client.post("/v1/chat/completions", json=chat_body(
        messages=[{"role": "user", "content": [{"type": "text", "text": "a"},
                                                {"type": "text", "text": "b"}]}]))
    assert r.status_code == 200, r.text
    r = await client.post("/v1/chat/completions", json=chat_body(max_tokens=5, top_logprobs=3,
                                                                 logprobs=True))
    assert r.status_code == 200, r.text
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "hi"})
    assert r.status_code == 200, r.text
    chat_default, chat_max, completion = engine.requests
    assert chat_default.prompt_token_ids == BYTE_LEVEL.encode("<user>a\nb\n<assistant>", False)
    p = chat_default.sampling_params
    assert p.max_tokens == engine.max_model_len - len(chat_default.prompt_token_ids)
    assert (p.temperature, p.top_p, p.top_k, p.logprobs, p.stop) == (1.0, 1.0, 0, None, ())
    assert chat_max.sampling_params.max_tokens == 5
    assert chat_max.sampling_params.logprobs == 3
    assert completion.sampling_params.max_tokens == 16
    assert completion.request_id.startswith("cmpl-")


@pytest.mark.parametrize("prompt", ["hello there", ["hello there"], [11, 12, 13], [[11, 12, 13]]])
async def test_completion_prompt_forms(client, engine, prompt):
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": prompt})
    assert r.status_code == 200, r.text
    expected = prompt if isinstance(prompt, list) else [prompt]
    expected = expected[0] if isinstance(expected[0], (str, list)) else expected
    if isinstance(expected, str):
        expected = BYTE_LEVEL.encode(expected)
    assert engine.requests[-1].prompt_token_ids == expected


# ---------------------------------------------------------------------------------------------
# responses


async def test_chat_non_streaming_response_shape(client, engine):
    r = await client.post("/v1/chat/completions", json=chat_body())
    assert r.status_code == 200
    body = r.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["model"] == MODEL and isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": engine.text}
    assert choice["finish_reason"] == "stop" and choice["logprobs"] is None
    num_output = len(BYTE_LEVEL.encode(engine.text, False)) + 1  # + eos
    num_prompt = len(engine.requests[0].prompt_token_ids)
    assert body["usage"] == {"prompt_tokens": num_prompt, "completion_tokens": num_output,
                             "total_tokens": num_prompt + num_output,
                             "prompt_tokens_details": {"cached_tokens": 8}}


async def test_chat_streaming_chunks(client, engine):
    r = await client.post("/v1/chat/completions", json=chat_body(stream=True))
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    chunks = parse_sse(r.text)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:])
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == engine.text
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "stop"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


async def test_streaming_include_usage(client, engine):
    r = await client.post("/v1/chat/completions", json=chat_body(
        stream=True, stream_options={"include_usage": True}, max_tokens=3, ignore_eos=True))
    chunks = parse_sse(r.text)
    *content, usage = chunks
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 3
    assert all(c["usage"] is None for c in content)
    assert content[-1]["choices"][0]["finish_reason"] == "length"
    r = await client.post("/v1/completions", json={
        "model": MODEL, "prompt": "hi", "stream": True, "max_tokens": 4, "ignore_eos": True,
        "stream_options": {"include_usage": True}})
    *content, usage = parse_sse(r.text)
    assert usage["usage"]["completion_tokens"] == 4 and usage["choices"] == []
    assert all(c["object"] == "text_completion" for c in content)


async def test_streamed_text_equals_non_streamed_text_with_stop(client, engine):
    engine.text = "你好世界 and 日本語 😀🎉 done. Then more text."
    for body in (chat_body(stop=["done"]), chat_body(stop=["🎉"]), chat_body()):
        whole = (await client.post("/v1/chat/completions", json=body)).json()
        streamed = parse_sse((await client.post("/v1/chat/completions",
                                                json={**body, "stream": True})).text)
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in streamed)
        assert text == whole["choices"][0]["message"]["content"]
        assert "\ufffd" not in text
        assert streamed[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert whole["choices"][0]["message"]["content"] == engine.text


async def test_stop_string_finishes_and_aborts_the_engine_request(client, engine):
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "stop": "France",
                                                   "max_tokens": 50})
    choice = r.json()["choices"][0]
    assert choice["text"] == "The capital of " and choice["finish_reason"] == "stop"
    assert engine.closed_early == [engine.requests[0].request_id]
    assert r.json()["usage"]["completion_tokens"] < len(BYTE_LEVEL.encode(engine.text, False))
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x",
                                                   "stop": ["France"], "max_tokens": 50,
                                                   "include_stop_str_in_output": True})
    assert r.json()["choices"][0]["text"] == "The capital of France"


async def test_chat_logprobs_shape(client, engine):
    r = await client.post("/v1/chat/completions", json=chat_body(logprobs=True, top_logprobs=2,
                                                                 max_tokens=4, ignore_eos=True))
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 4
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert entry["logprob"] == -0.5 and len(entry["top_logprobs"]) == 2
        assert bytes(entry["bytes"]).decode() == entry["token"]
        assert set(entry["top_logprobs"][0]) == {"token", "logprob", "bytes"}
    assert "".join(e["token"] for e in content) == r.json()["choices"][0]["message"]["content"]
    r = await client.post("/v1/chat/completions", json=chat_body(logprobs=True, stream=True,
                                                                 max_tokens=3, ignore_eos=True))
    chunks = parse_sse(r.text)
    entries = [e for c in chunks for e in (c["choices"][0]["logprobs"] or {}).get("content", [])]
    assert len(entries) == 3 and all(e["top_logprobs"] == [] for e in entries)


async def test_completion_logprobs_shape(client, engine):
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "logprobs": 2,
                                                   "max_tokens": 5, "ignore_eos": True})
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 5
    assert "".join(lp["tokens"]) == choice["text"]
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(5)]
    assert all(len(d) <= 3 and lp["tokens"][i] in d for i, d in enumerate(lp["top_logprobs"]))
    assert lp["token_logprobs"] == [-0.5] * 5


async def test_models_health_version_metrics(client, engine):
    models = (await client.get("/v1/models")).json()
    assert models["object"] == "list" and models["data"][0]["id"] == MODEL
    assert (await client.get(f"/v1/models/{MODEL}")).status_code == 200
    assert (await client.get("/v1/models/other")).status_code == 404
    assert (await client.get("/health")).status_code == 200
    assert "version" in (await client.get("/version")).json()
    await client.post("/v1/chat/completions", json=chat_body())
    text = (await client.get("/metrics")).text
    assert metric_value(text, of_model("tidal_requests_total", status="success")) == 1
    assert metric_value(text, of_model("tidal_requests_total", status="error")) == 0
    assert metric_value(text, of_model("tidal_request_ttft_seconds_count")) == 1
    assert metric_value(text, of_model("tidal_request_e2e_seconds_count")) == 1
    num_output = len(BYTE_LEVEL.encode(engine.text, False)) + 1
    assert metric_value(text, of_model("tidal_request_itl_seconds_count")) == num_output - 1
    assert metric_value(text, of_model("tidal_generation_tokens_total")) == num_output
    assert metric_value(text, of_model("tidal_prompt_tokens_total")) == len(engine.requests[0].prompt_token_ids)
    assert metric_value(text, of_model("tidal_prefix_cache_hit_tokens_total")) == 8
    assert metric_value(text, "tidal_running_requests") == 1
    assert metric_value(text, "tidal_waiting_requests") == 2
    assert metric_value(text, "tidal_kv_blocks_used") == 3
    assert metric_value(text, "tidal_kv_blocks_total") == 40
    engine.stats_value = None
    assert metric_value((await client.get("/metrics")).text, "tidal_kv_blocks_used") == 0


def test_apps_have_separate_registries():
    first, second = ScriptedEngine(), ScriptedEngine()
    make_app(first)
    make_app(second)  # would raise "Duplicated timeseries" on a shared registry


# ---------------------------------------------------------------------------------------------
# errors


ERROR_CASES = [
    ("/v1/chat/completions", chat_body(model="nope"), 404, "model"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, 400, "model"),
    ("/v1/chat/completions", chat_body(temperature=-0.1), 400, "temperature"),
    ("/v1/chat/completions", chat_body(top_p=0), 400, "top_p"),
    ("/v1/chat/completions", chat_body(top_p=1.5), 400, "top_p"),
    ("/v1/chat/completions", chat_body(max_tokens=0), 400, "max_tokens"),
    ("/v1/chat/completions", chat_body(max_completion_tokens=-3), 400, "max_completion_tokens"),
    ("/v1/chat/completions", chat_body(n=17), 400, "n"),  # the server's max_n is 16
    ("/v1/chat/completions", chat_body(n=0), 400, "n"),
    ("/v1/chat/completions", chat_body(some_unknown_field={"a": 1}), 400, "some_unknown_field"),
    ("/v1/chat/completions", chat_body(logprobs=True, top_logprobs=21), 400, "top_logprobs"),
    ("/v1/chat/completions", chat_body(top_logprobs=2), 400, None),
    ("/v1/chat/completions", chat_body(messages=[]), 400, "messages"),
    ("/v1/chat/completions", chat_body(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]), 400, None),
    ("/v1/chat/completions", chat_body(chat_template_kwargs={"fail": True}), 400, "messages"),
    ("/v1/chat/completions", chat_body(chat_template_kwargs={"chat_template": "{{ 1 }}"}), 400,
     "chat_template_kwargs"),
    ("/v1/chat/completions", chat_body(max_tokens=250), 400, "max_tokens"),
    ("/v1/chat/completions", chat_body(messages=[{"role": "user", "content": "word " * 300}]),
     400, "messages"),
    ("/v1/chat/completions", chat_body(stop_token_ids=[10 ** 6]), 400, "stop_token_ids"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "echo": True, "logprobs": 1}, 400, "echo"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "best_of": 2, "stream": True}, 400, "best_of"),
    ("/v1/completions", {"model": MODEL, "prompt": ["a", "b"]}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [1, 10 ** 6]}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "seed": 2 ** 64}, 400, "seed"),
    ("/v1/completions", {"model": "nope", "prompt": "x"}, 404, "model"),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), ERROR_CASES)
async def test_error_table(client, engine, path, body, status, param):
    r = await client.post(path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == ("BadRequestError" if status == 400 else "NotFoundError")
    if param is not None:
        assert error["param"] == param
    assert engine.requests == []  # nothing invalid reaches the engine
    r = await client.post("/v1/chat/completions", json=chat_body())
    assert r.status_code == 200  # and the server keeps serving


async def test_over_context_message_names_both_numbers(client, engine):
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": [1] * 100,
                                                   "max_tokens": 200})
    message = r.json()["error"]["message"]
    assert r.status_code == 400 and "256" in message and "100" in message and "200" in message
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": [1] * 256})
    assert r.status_code == 400 and "256" in r.json()["error"]["message"]
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": [1] * 250})
    assert r.status_code == 200 and engine.requests[-1].sampling_params.max_tokens == 6


@pytest.mark.parametrize("body", [b"{not json", b"", b"[1, 2]", b'{"model": 3}'])
async def test_malformed_bodies_are_400(client, engine, body):
    r = await client.post("/v1/chat/completions", content=body,
                          headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "BadRequestError"
    assert engine.requests == []


async def test_unknown_route_and_method_have_openai_shape(client):
    r = await client.get("/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    r = await client.get("/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()


async def test_body_limit_413(engine):
    app = make_app(engine, max_request_body_bytes=1000)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        big = chat_body(messages=[{"role": "user", "content": "x" * 2000}])
        r = await c.post("/v1/chat/completions", json=big)
        assert r.status_code == 413 and r.json()["error"]["type"] == "RequestTooLargeError"

        async def chunked():  # no Content-Length: the streamed size is what counts
            data = json.dumps(big).encode()
            for i in range(0, len(data), 100):
                yield data[i:i + 100]

        r = await c.post("/v1/chat/completions", content=chunked())
        assert r.status_code == 413
        assert engine.requests == []
        assert (await c.post("/v1/chat/completions", json=chat_body())).status_code == 200


async def test_engine_unhealthy_is_503(client, engine):
    engine.healthy = False
    assert (await client.get("/health")).status_code == 503
    r = await client.post("/v1/chat/completions", json=chat_body())
    assert r.status_code == 503 and engine.requests == []


async def test_engine_dead_mid_request(client, engine):
    engine.fail_with = EngineDeadError("worker exited")
    r = await client.post("/v1/chat/completions", json=chat_body())
    assert r.status_code == 503 and "worker exited" in r.json()["error"]["message"]
    # A stream sends its headers with its first token: failing before it is the response's own status.
    r = await client.post("/v1/chat/completions", json=chat_body(stream=True))
    assert r.status_code == 503 and "worker exited" in r.json()["error"]["message"]


async def test_a_stream_shed_before_its_first_token_is_a_503_with_retry_after(client, engine):
    # What the router raises when a request's first-token deadline passes in a worker's queue.
    engine.fail_with = OverloadedError("the request waited 30 s in an overloaded worker's queue", 7)
    for path, body in (("/v1/chat/completions", chat_body(stream=True)),
                       ("/v1/completions", {"model": MODEL, "prompt": "x", "stream": True})):
        r = await client.post(path, json=body)
        assert r.status_code == 503 and r.headers["retry-after"] == "7", r.text
        assert "overloaded worker's queue" in r.json()["error"]["message"]
    engine.fail_with = None
    assert (await client.post("/v1/chat/completions", json=chat_body(stream=True))).status_code == 200
    text = (await client.get("/metrics")).text
    assert metric_value(text, of_model("tidal_requests_total", status="rejected")) == 2
    assert metric_value(text, of_model("tidal_requests_total", status="error")) == 0


async def test_internal_errors_are_500_and_server_keeps_serving(client, engine):
    engine.fail_with = RuntimeError("boom")
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x"})
    assert r.status_code == 500 and r.json()["error"]["type"] == "InternalServerError"
    engine.fail_with = None

    def error_delta(request):
        return [TokenDelta(request_id=request.request_id, new_token_ids=[], finished=True,
                           finish_reason="error", error="kernel failed")]
    engine.script = error_delta
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x"})
    assert r.status_code == 500 and "kernel failed" in r.json()["error"]["message"]
    engine.script = engine.default_script
    assert (await client.post("/v1/completions", json={"model": MODEL, "prompt": "x"})).is_success
    text = (await client.get("/metrics")).text
    assert metric_value(text, of_model("tidal_requests_total", status="error")) == 2


# ---------------------------------------------------------------------------------------------
# real server: disconnects, oversized bodies, the official client


async def test_sse_response_closes_an_abandoned_body_iterator():
    """Client stops reading (send blocks), then disconnects: the body iterator, suspended at
    a yield, must still be closed (that is what aborts the engine request)."""
    closed = asyncio.Event()
    sending = asyncio.Event()

    async def body():
        try:
            while True:
                yield b"data: {}\n\n"
        finally:
            closed.set()

    async def send(message):
        if message["type"] == "http.response.body":
            sending.set()
            await asyncio.Event().wait()  # the socket buffer is full

    async def receive():
        await sending.wait()
        return {"type": "http.disconnect"}

    response = SSEResponse(body())
    scope = {"type": "http", "asgi": {"spec_version": "2.3"}}
    await asyncio.wait_for(response(scope, receive, send), timeout=5)
    assert closed.is_set()


async def test_stream_disconnect_aborts_engine_request():
    engine = ScriptedEngine(delay_s=0.01)
    engine.script = endless_script
    async with live_server(make_app(engine)) as url:
        async with httpx.AsyncClient(base_url=url) as c:
            async with c.stream("POST", "/v1/chat/completions",
                                json=chat_body(stream=True, max_tokens=200)) as r:
                events = 0
                async for line in r.aiter_lines():
                    if line:
                        assert line.startswith("data: ")
                        events += 1
                    if events == 3:
                        break
            await wait_until(lambda: len(engine.closed_early) == 1)
            assert engine.active == set()
            text = (await c.get("/metrics")).text
            assert metric_value(text, of_model("tidal_requests_total", status="abort")) == 1


async def test_non_streaming_disconnect_aborts_engine_request():
    engine = ScriptedEngine(delay_s=0.01)
    engine.script = endless_script
    async with live_server(make_app(engine)) as url:
        async with httpx.AsyncClient(base_url=url, timeout=0.3) as c:
            with pytest.raises(httpx.ReadTimeout):
                await c.post("/v1/completions", json={"model": MODEL, "prompt": "x",
                                                      "max_tokens": 200})
        await wait_until(lambda: len(engine.closed_early) == 1)
        assert engine.active == set()


async def test_many_concurrent_requests_some_abandoned():
    engine = ScriptedEngine(delay_s=0.002)
    async with live_server(make_app(engine)) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30,
                                     limits=httpx.Limits(max_connections=100)) as c:
            async def one(i: int) -> str | None:
                body = chat_body(stream=i % 2 == 0)
                if i % 5 != 4:
                    r = await c.post("/v1/chat/completions", json=body)
                    assert r.status_code == 200
                    return None
                async with c.stream("POST", "/v1/chat/completions", json=body) as r:
                    async for _ in r.aiter_bytes():
                        break  # walk away after the first bytes
                return "abandoned"

            results = await asyncio.gather(*(one(i) for i in range(60)))
        num_abandoned = results.count("abandoned")
        await wait_until(lambda: not engine.active)
        assert len(engine.requests) == 60
        assert len(engine.closed_early) <= num_abandoned  # a few finish before the close lands


async def test_oversized_body_on_real_server(engine):
    async with live_server(make_app(engine, max_request_body_bytes=100_000)) as url:
        async with httpx.AsyncClient(base_url=url) as c:
            big = chat_body(messages=[{"role": "user", "content": "x" * 300_000}])
            r = await c.post("/v1/chat/completions", json=big)
            assert r.status_code == 413
            r = await c.post("/v1/chat/completions", json=chat_body())
            assert r.status_code == 200
        assert engine.requests and len(engine.requests) == 1


async def test_official_openai_client(engine):
    async with live_server(make_app(engine)) as url:
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        chat = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=0)
        assert chat.choices[0].message.content == engine.text
        assert chat.usage.prompt_tokens_details.cached_tokens == 8
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True,
            stream_options={"include_usage": True})
        pieces, usage = [], None
        async for chunk in stream:
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
            usage = chunk.usage or usage
        assert "".join(pieces) == engine.text and usage.completion_tokens > 0
        completion = await client.completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=3,
                                                     extra_body={"ignore_eos": True})
        assert completion.choices[0].finish_reason == "length"
        with pytest.raises(openai.NotFoundError):
            await client.completions.create(model="nope", prompt="x")
        with pytest.raises(openai.BadRequestError):
            await client.completions.create(model=MODEL, prompt="x", temperature=-1)
        engine.fail_with = EngineDeadError("gone")
        with pytest.raises(openai.APIError):
            async for _ in await client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True):
                pass
        await client.close()


async def test_long_prompts_are_tokenized_off_the_event_loop():
    import threading

    from tidal.frontend.chat_tokens import TOKENIZE_IN_THREAD_CHARS, encode_text
    from tidal.tokenizer import load_tokenizer

    class Recording:
        def __init__(self, tokenizer):
            self.tokenizer, self.threads = tokenizer, []

        def encode(self, text, add_special_tokens=True):
            self.threads.append(threading.get_ident())
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    tokenizer = Recording(load_tokenizer(None))
    short, long = "What pulls the tide?", "The moon pulls the tide. " * (TOKENIZE_IN_THREAD_CHARS // 20)
    for text in (short, long):
        assert await encode_text(tokenizer, text, add_special_tokens=False) == \
            list(tokenizer.tokenizer.encode(text, add_special_tokens=False))
    loop_thread = threading.get_ident()
    assert tokenizer.threads[0] == loop_thread and tokenizer.threads[1] != loop_thread
