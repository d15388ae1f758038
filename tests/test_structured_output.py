"""Structured output: the request fields, the checks, and the engine that enforces them.

- `tidal.grammar.check` takes what llguidance takes and says why not otherwise.
- The frontend turns `response_format`, `guided_*` and `structured_outputs` into one
  `StructuredOutput` on the `AddRequest` (through the real router's decision), and answers a bad
  schema, regex, grammar, an empty choice list, an unknown option or two constraints at once with
  a 400 naming the field, before any request reaches the engine.
- `GrammarMask.apply` forbids exactly the tokens whose bit is clear, on the masked rows only.
- The engine (real `build_engine`, dummy:tiny-llama: random weights, so the grammar alone makes the
  output parse) finishes JSON-schema, regex, choice and grammar requests with output that obeys
  them; a migrated request (its output so far resumed in the prompt) and a remotely prefilled one
  (its first token from the prefill engine) continue under the same grammar, token for token as an
  uninterrupted greedy run; history that breaks the grammar is refused; no matcher outlives its
  request (finished, aborted waiting or running, refused), and grammar time is counted.
"""

from __future__ import annotations

import json
import re
import time

import httpx
import msgspec
import pytest
import torch
from _routed_engine import RoutedEngine
from test_frontend_unit import MODEL, TOKENIZER_FACTORIES, chat_body, make_app

from tidal.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from tidal.engine.engine import EngineCore
from tidal.engine.factory import build_engine
from tidal.engine.structured_output import GrammarMask
from tidal.grammar import check
from tidal.protocol import AddRequest, SamplingParams, StructuredOutput, TokenDelta
from tidal.tokenizer import load_tokenizer
from tidal.transfer import KVTransferConfig

SCHEMA = {"type": "object",
          "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 99},
                         "color": {"enum": ["red", "green", "blue"]},
                         "tag": {"type": "string", "pattern": "^[a-z]{1,6}$"}},
          "required": ["ok", "n", "color", "tag"], "additionalProperties": False}
JSON = StructuredOutput(kind="json", spec=json.dumps(SCHEMA))
REGEX = StructuredOutput(kind="regex", spec=r"[0-9]{3}-[a-z]{2,4}")
CHOICE = StructuredOutput(kind="choice", spec=json.dumps(["yes", "no", "maybe later"]))
GRAMMAR = StructuredOutput(kind="grammar", spec='start: "(" NUM ("," NUM)~1..3 ")"\nNUM: /[0-9]{1,2}/')
LONG = StructuredOutput(kind="regex", spec="[0-9]{100}")  # many steps long whatever the tokens
PROMPT = [5, 6, 7, 8, 9, 10, 11]


def _obeys(structured: StructuredOutput, text: str) -> bool:
    if structured.kind == "json":
        value = json.loads(text)
        return (set(value) == set(SCHEMA["required"]) and isinstance(value["ok"], bool)
                and isinstance(value["n"], int) and 0 <= value["n"] <= 99 and value["color"] in ("red", "green", "blue")
                and re.fullmatch("[a-z]{1,6}", value["tag"]) is not None)
    if structured.kind == "regex":
        return re.fullmatch(structured.spec, text) is not None
    if structured.kind == "choice":
        return text in json.loads(structured.spec)
    return re.fullmatch(r"\([0-9]{1,2}(,[0-9]{1,2}){1,3}\)", text) is not None


# ---- the check ----------------------------------------------------------------------------------


@pytest.mark.parametrize("structured", [JSON, REGEX, CHOICE, GRAMMAR, StructuredOutput(kind="json_object"),
                                        StructuredOutput(kind="grammar", spec='root ::= "a" | "b"')])
def test_check_takes_valid_constraints(structured):
    assert check(structured.kind, structured.spec) == ""


@pytest.mark.parametrize("kind,spec,says", [
    ("json", "{", "EOF"), ("json", '{"type": "objec"}', "objec"), ("json", "[1]", "object"),
    ("regex", "[a-", "unclosed"), ("regex", "(?=a)b", "look-around"), ("choice", "[]", "non-empty"),
    ("choice", '["a", 3]', "strings"), ("grammar", 'start: "a" x', "unknown name")])
def test_check_names_what_llguidance_refuses(kind, spec, says):
    assert says in check(kind, spec)


# ---- the frontend ---------------------------------------------------------------------------------


@pytest.fixture
def engine():
    engine = RoutedEngine()
    yield engine
    engine.close()


@pytest.fixture
async def client(engine):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=make_app(engine)), base_url="http://test") as c:
        yield c


def _completion_body(**kwargs) -> dict:
    return {"model": MODEL, "prompt": "Say something", **kwargs}


@pytest.mark.parametrize("path,body,expected", [
    ("chat", {"response_format": {"type": "text"}}, None),
    ("chat", {"response_format": {"type": "json_object"}}, StructuredOutput(kind="json_object")),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA,
                                                                          "strict": True}}}, JSON),
    ("chat", {"guided_json": SCHEMA}, JSON),
    ("chat", {"guided_regex": REGEX.spec}, REGEX),
    ("completions", {"guided_json": json.dumps(SCHEMA)}, JSON),
    ("completions", {"guided_choice": ["yes", "no", "maybe later"]}, CHOICE),
    ("completions", {"guided_grammar": GRAMMAR.spec}, GRAMMAR),
    ("completions", {"response_format": {"type": "json_object"}}, StructuredOutput(kind="json_object")),
    ("chat", {"structured_outputs": {"choice": ["yes", "no", "maybe later"]}}, CHOICE),
    ("completions", {"structured_outputs": {"json": SCHEMA}}, JSON),
    ("completions", {"structured_outputs": {"regex": REGEX.spec}}, REGEX),
    ("chat", {"structured_outputs": {"grammar": GRAMMAR.spec}}, GRAMMAR),
    ("chat", {"structured_outputs": {"json_object": True}}, StructuredOutput(kind="json_object")),
])
async def test_fields_reach_the_engine_as_one_structured_output(client, engine, path, body, expected):
    url, full = ("/v1/chat/completions", chat_body(**body)) if path == "chat" \
        else ("/v1/completions", _completion_body(**body))
    response = await client.post(url, json=full)
    assert response.status_code == 200, response.text
    assert engine.requests[-1].sampling_params.structured == expected


@pytest.mark.parametrize("body,param,says", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objec"}}}},
     "response_format", "objec"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema"),
    ({"response_format": {"type": "xml"}}, "response_format.type", "json_schema"),
    ({"guided_regex": "[a-"}, "guided_regex", "regular expression"),
    ({"guided_json": "{not json"}, "guided_json", "JSON schema"),
    ({"guided_choice": []}, "guided_choice", "at least one"),
    ({"guided_grammar": 'start: "a" x'}, "guided_grammar", "unknown name"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice", "at least one"),
    ({"structured_outputs": {"regex": "(?=a)"}}, "structured_outputs.regex", "look-around"),
    ({"structured_outputs": {"disable_any_whitespace": True}}, "structured_outputs.disable_any_whitespace",
     "Unrecognized request argument"),
    ({"guided_regex": "a+", "guided_choice": ["a"]}, "guided_choice", "Only one"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
     "structured_outputs.regex", "Only one"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs.choice", "Only one"),
])
async def test_bad_constraints_are_400s_naming_the_field(client, engine, body, param, says):
    for stream in (False, True):
        response = await client.post("/v1/chat/completions", json=chat_body(stream=stream, **body))
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == param and says in error["message"], error
    assert engine.requests == []  # nothing reached the engine


async def test_constraints_compile_over_the_servers_tokenizer_before_the_engine():
    """With the server's real tokenizer the frontend compiles as the engine does: a regex whose lexer
    over the vocabulary is too large passes the syntax checks but is a 400 here."""
    engine = RoutedEngine(tokenizer=TOKENIZER_FACTORIES["embedded"](), max_model_len=512)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=make_app(engine)),
                                     base_url="http://test") as client:
            huge = "(a|b)*" * 2000
            assert check("regex", huge) == ""
            for url, body, param in (("/v1/chat/completions", chat_body(guided_regex=huge), "guided_regex"),
                                     ("/v1/completions", _completion_body(structured_outputs={"regex": huge}),
                                      "structured_outputs.regex")):
                response = await client.post(url, json=body)
                error = response.json()["error"]
                assert response.status_code == 400 and error["param"] == param and "lexer" in error["message"], error
            assert engine.requests == []
            response = await client.post("/v1/chat/completions", json=chat_body(guided_json=SCHEMA))
            assert response.status_code == 200 and engine.requests[-1].sampling_params.structured == JSON
    finally:
        engine.close()


# ---- the mask -------------------------------------------------------------------------------------


def test_mask_forbids_exactly_the_clear_bits_of_its_rows():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 70, generator=generator)
    bits = torch.randint(0, 2, (2, 96), generator=generator, dtype=torch.int32)  # 3 words: 96 ids, 70 real
    words = (bits.view(2, 3, 32).to(torch.int64) << torch.arange(32)).sum(-1)
    bitmask = torch.tensor((words - (words >= 2**31) * 2**32).tolist(), dtype=torch.int32)
    masked = GrammarMask([1, 3], bitmask).apply(logits.clone())
    expected = logits.clone()
    for i, row in enumerate((1, 3)):
        expected[row, :70][bits[i, :70] == 0] = float("-inf")
    assert torch.equal(masked, expected)
    wide = GrammarMask([0], bitmask[:1, :2]).apply(logits.clone())  # 64 ids known: the rest forbidden
    assert torch.isinf(wide[0, 64:]).all() and torch.equal(wide[1:], logits[1:])


@pytest.mark.gpu
def test_mask_on_a_gpu_equals_the_host_mask():
    generator = torch.Generator().manual_seed(1)
    bitmask = torch.randint(-2**31, 2**31 - 1, (3, 30), generator=generator, dtype=torch.int32)  # 960 ids known
    for num_rows, rows in ((5, [0, 2, 4]), (3, [0, 1, 2])):  # some rows masked; every row masked
        logits = torch.randn(num_rows, 1000, generator=generator)
        host = GrammarMask(rows, bitmask).apply(logits.clone())
        device = GrammarMask(rows, bitmask.pin_memory()).apply(logits.cuda())
        assert torch.equal(device.cpu(), host)


# ---- the engine -----------------------------------------------------------------------------------


def _config() -> EngineConfig:
    return EngineConfig(model=ModelConfig(model="dummy:tiny-llama", dtype="float32", seed=3),
                        cache=CacheConfig(block_size=4, num_blocks=256), scheduler=SchedulerConfig(token_budget=64))


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def aggregated():
    engine = build_engine(_config())
    yield engine
    engine.close()


def _params(structured: StructuredOutput, **kwargs) -> SamplingParams:
    return SamplingParams(**{"max_tokens": 96, "temperature": 0.0, "structured": structured, **kwargs})


def _run(engines: dict[str, EngineCore], request_ids: set[str], timeout_s: float = 60.0) -> dict[str, list[TokenDelta]]:
    """Step every engine (delivering KV releases as workers do) until each request has finished."""
    got: dict[str, list[TokenDelta]] = {}
    deadline = time.monotonic() + timeout_s
    while not all(got.get(r) and got[r][-1].finished for r in request_ids):
        assert time.monotonic() < deadline, f"unfinished: {got}"
        for engine in engines.values():
            if engine.has_work() or engine.has_pulls():
                for delta in engine.step():
                    got.setdefault(delta.request_id, []).append(delta)
            for addr, request_id in engine.connector.take_releases():
                engines[addr].connector.release(request_id)
    return got


def _tokens(deltas: list[TokenDelta]) -> list[int]:
    return [t for d in deltas for t in d.new_token_ids]


def _generate(engine: EngineCore, request_id: str, params: SamplingParams, prompt=PROMPT, **add) -> list[TokenDelta]:
    engine.add_request(AddRequest(request_id=request_id, prompt_token_ids=list(prompt), sampling_params=params,
                                  **add))
    return _run({"a": engine}, {request_id})[request_id]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_outputs_obey_their_grammar(aggregated, tokenizer, temperature):
    kinds = [JSON, REGEX, CHOICE, GRAMMAR]
    for i, structured in enumerate(kinds):
        aggregated.add_request(AddRequest(request_id=f"k{temperature}-{i}", prompt_token_ids=PROMPT,
                                          sampling_params=_params(structured, temperature=temperature, seed=i)))
    got = _run({"a": aggregated}, {f"k{temperature}-{i}" for i in range(len(kinds))})
    for i, structured in enumerate(kinds):
        deltas = got[f"k{temperature}-{i}"]
        text = tokenizer.decode(_tokens(deltas))
        assert deltas[-1].finish_reason == "stop" and _obeys(structured, text), (structured.kind, text)
    assert aggregated.structured.num_active == 0
    assert aggregated.stats().grammar_seconds_total > 0


def test_free_text_requests_beside_structured_ones_are_unmasked(aggregated, tokenizer):
    free = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    alone = _tokens(_generate(aggregated, "free-alone", free))
    aggregated.add_request(AddRequest(request_id="free-mixed", prompt_token_ids=PROMPT, sampling_params=free))
    aggregated.add_request(AddRequest(request_id="json-mixed", prompt_token_ids=PROMPT[:4], sampling_params=_params(JSON)))
    got = _run({"a": aggregated}, {"free-mixed", "json-mixed"})
    assert _tokens(got["free-mixed"]) == alone
    assert _obeys(JSON, tokenizer.decode(_tokens(got["json-mixed"])))


def test_migrated_request_continues_under_its_grammar(aggregated, tokenizer):
    whole = _tokens(_generate(aggregated, "whole", _params(JSON)))
    for k in (1, 5, len(whole) - 1):
        resumed = _generate(aggregated, f"moved-{k}", _params(JSON, max_tokens=96 - k), prompt=PROMPT + whole[:k],
                            num_resumed_tokens=k)
        assert whole[:k] + _tokens(resumed) == whole, k  # greedy: the tokens an uninterrupted run gives
        assert resumed[-1].finish_reason == "stop"
    assert aggregated.structured.num_active == 0


def test_history_that_breaks_the_grammar_is_refused(aggregated, tokenizer):
    prose = tokenizer.encode("Hello there", add_special_tokens=False)
    deltas = _generate(aggregated, "broken", _params(JSON), prompt=PROMPT + prose, num_resumed_tokens=len(prose))
    assert deltas[-1].finish_reason == "error" and "does not match its structured output" in deltas[-1].error
    assert aggregated.structured.num_active == 0


def test_no_matcher_outlives_its_request(aggregated):
    structured = aggregated.structured
    aggregated.add_request(AddRequest(request_id="waiting", prompt_token_ids=PROMPT, sampling_params=_params(JSON)))
    aggregated.abort_request("waiting")  # before its first step
    assert structured.num_active == 1
    aggregated.step()
    assert structured.num_active == 0
    aggregated.add_request(AddRequest(request_id="running", prompt_token_ids=PROMPT,
                                      sampling_params=_params(LONG, max_tokens=400)))
    for _ in range(3):
        aggregated.step()
    assert structured.has("running")
    # A second request under the running one's id is refused without touching the first's matcher.
    aggregated.add_request(AddRequest(request_id="running", prompt_token_ids=PROMPT, sampling_params=_params(JSON)))
    assert aggregated.step()[0].finish_reason == "error" and structured.has("running")
    aggregated.abort_request("running")
    aggregated.step()
    assert structured.num_active == 0 and not aggregated.scheduler.requests
    assert aggregated.kv.num_used_blocks == 0
    bad = StructuredOutput(kind="regex", spec="[a-")  # past the frontend: the engine refuses it too
    assert "invalid" in _generate(aggregated, "bad", _params(bad))[-1].error
    assert structured.num_active == 0


def test_remote_prefill_first_token_obeys_and_decode_continues(aggregated, tokenizer):
    transfer = KVTransferConfig(backend="fake")
    prefill = build_engine(_config(), worker_id="p", transfer_config=transfer)
    decode = build_engine(_config(), worker_id="d", transfer_config=transfer)
    prefill.connector.release_addr = "p"
    engines = {"p": prefill, "d": decode}
    try:
        expected = _tokens(_generate(aggregated, "agg", _params(JSON)))
        params = _params(JSON)
        prefill.add_request(AddRequest(request_id="r", prompt_token_ids=PROMPT, hold_kv=True,
                                       sampling_params=msgspec.structs.replace(params, max_tokens=1)))
        first = _run(engines, {"r"})["r"][-1]
        assert first.finish_reason == "length" and first.new_token_ids == expected[:1]
        decode.add_request(AddRequest(request_id="r", prompt_token_ids=PROMPT, sampling_params=params,
                                      kv_transfer_params=first.kv_transfer_params,
                                      output_token_ids=first.new_token_ids))
        rest = _run(engines, {"r"})["r"]
        assert first.new_token_ids + _tokens(rest) == expected and rest[-1].finish_reason == "stop"
        # A prefill whose first token completes the grammar stops there, holding nothing.
        one = StructuredOutput(kind="choice", spec=json.dumps(["x", "y"]))  # one token either way
        prefill.add_request(AddRequest(request_id="c", prompt_token_ids=PROMPT, hold_kv=True,
                                       sampling_params=_params(one, max_tokens=1)))
        done = _run(engines, {"c"})["c"][-1]
        assert tokenizer.decode(done.new_token_ids) in ("x", "y")
        assert done.finish_reason == "stop" and done.kv_transfer_params is None
        for engine in engines.values():
            assert engine.structured.num_active == 0 and engine.kv.num_used_blocks == 0
    finally:
        prefill.close()
        decode.close()


def test_a_tokenizer_the_grammar_library_cannot_read_refuses_only_structured_requests(tmp_path):
    """A word-level tokenizer without a decoder (as tiny test models have): building the compiler
    (what every engine with a tokenizer does) succeeds; a constraint gets the reason instead of a
    matcher, so the engine serves free text and answers structured requests with an error."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    from tidal.grammar import GrammarCompiler
    from tidal.tokenizer import Tokenizer

    backend = Backend(models.WordLevel({f"w{i}": i for i in range(64)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    compiler = GrammarCompiler(Tokenizer(backend, eos_token="w1"))
    refusal = compiler.compile(StructuredOutput(kind="regex", spec="w[0-9]"))
    assert isinstance(refusal, str) and "not available for this model's tokenizer" in refusal
