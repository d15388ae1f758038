"""End to end: structured output through `tidal serve` on the embedded SmolLM2-135M-Instruct (CPU),
with the official `openai` client.

- A router over two aggregated workers (examples/agg_router.yaml): `response_format` json_schema
  (strict) and json_object on chat, streamed and not, parse and match the schema; `guided_regex` on
  completions matches; `structured_outputs.choice` on chat is one of the choices; a bad schema is a
  400 naming `response_format`; the workers report grammar time in their load reports.
- Disaggregated (examples/disagg.yaml, every prompt prefilled remotely): the prefill worker's first
  token obeys the schema and the decode worker finishes it; nothing stays held.
"""

from __future__ import annotations

import json
import re
import time

import httpx
import openai
import pytest
from _server import example_config, metrics, running_server

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 20},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150},
                         "city": {"type": "string", "maxLength": 24}},
          "required": ["name", "age", "city"], "additionalProperties": False}
PERSON = [{"role": "user", "content": "Describe Alice, a 30 year old engineer from Paris, as JSON."}]
JSON_SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}


@pytest.fixture(scope="module")
def routed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("structured")
    with running_server(["-f", str(example_config(tmp, "agg_router.yaml"))], tmp / "agg.log") as url:
        yield url


@pytest.fixture(scope="module")
def client(routed):
    with openai.OpenAI(base_url=routed + "/v1", api_key="unused", max_retries=0, timeout=300) as c:
        yield c


def _assert_person(text: str) -> None:
    """The schema, checked by hand (no jsonschema package here)."""
    person = json.loads(text)
    assert set(person) == {"name", "age", "city"}, person
    assert isinstance(person["name"], str) and len(person["name"]) <= 20
    assert isinstance(person["age"], int) and 0 <= person["age"] <= 150
    assert isinstance(person["city"], str) and len(person["city"]) <= 24


def _streamed(client: openai.OpenAI, **kwargs) -> tuple[str, str]:
    text, finish = "", None
    for chunk in client.chat.completions.create(model=MODEL, stream=True, **kwargs):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    return text, finish


def test_json_schema_strict_streamed_and_not(client):
    reply = client.chat.completions.create(model=MODEL, messages=PERSON, temperature=0, max_tokens=120,
                                           response_format=JSON_SCHEMA_FORMAT)
    assert reply.choices[0].finish_reason == "stop"
    _assert_person(reply.choices[0].message.content)
    text, finish = _streamed(client, messages=PERSON, temperature=0.8, seed=7, max_tokens=120,
                             response_format=JSON_SCHEMA_FORMAT)
    assert finish == "stop"
    _assert_person(text)


def test_json_object(client):
    messages = [{"role": "user", "content": 'Reply with a JSON object {"capital": ...} naming the capital of France.'}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=60,
                                           response_format={"type": "json_object"})
    assert reply.choices[0].finish_reason == "stop", reply.choices[0].message.content
    assert isinstance(json.loads(reply.choices[0].message.content), dict)
    text, finish = _streamed(client, messages=messages, temperature=0, max_tokens=60,
                             response_format={"type": "json_object"})
    assert finish == "stop" and text == reply.choices[0].message.content


def test_regex_on_completions_and_choice_on_chat(client):
    pattern = r" \d{3}-\d{3}-\d{4}"
    reply = client.completions.create(model=MODEL, prompt="Alice's phone number is", temperature=0, max_tokens=30,
                                      extra_body={"guided_regex": pattern})
    assert reply.choices[0].finish_reason == "stop" and re.fullmatch(pattern, reply.choices[0].text)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="Alice's phone number is", temperature=0, max_tokens=30, stream=True,
        extra_body={"structured_outputs": {"regex": pattern}}) if c.choices)
    assert streamed == reply.choices[0].text
    question = [{"role": "user", "content": "Is Paris in France? Answer yes or no."}]
    reply = client.chat.completions.create(model=MODEL, messages=question, temperature=1.0, max_tokens=10,
                                           extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert reply.choices[0].message.content in ("yes", "no") and reply.choices[0].finish_reason == "stop"


def test_bad_schema_is_a_400_naming_the_field(client, routed):
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objec"}}}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=PERSON, max_tokens=5, response_format=bad)
    assert caught.value.body["param"] == "response_format" and "objec" in caught.value.body["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=PERSON, max_tokens=5,
                                       extra_body={"guided_regex": "a", "guided_choice": ["a"]})
    assert caught.value.body["param"] == "guided_choice"
    workers = httpx.get(routed + "/admin/workers", timeout=10).json()["workers"]
    assert len(workers) == 2 and sum(w["stats"]["grammar_seconds_total"] for w in workers) > 0


def test_disaggregated_first_token_obeys_and_decode_finishes(tmp_path):
    path = example_config(tmp_path, "disagg.yaml", disaggregation={"local_prefill_threshold": 1})
    with running_server(["-f", str(path)], tmp_path / "disagg.log") as url:
        with openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300) as c:
            reply = c.chat.completions.create(model=MODEL, messages=PERSON, temperature=0, max_tokens=120,
                                              response_format=JSON_SCHEMA_FORMAT)
            text, finish = _streamed(c, messages=PERSON, temperature=0, max_tokens=120,
                                     response_format=JSON_SCHEMA_FORMAT)
        assert reply.choices[0].finish_reason == finish == "stop"
        _assert_person(reply.choices[0].message.content)
        assert text == reply.choices[0].message.content
        assert metrics(url).get('tidal_prefill_decisions_total{where="remote"}', 0) == 2
        deadline = time.monotonic() + 20
        while True:
            stats = {w["role"]: w["stats"] for w in httpx.get(url + "/admin/workers", timeout=10).json()["workers"]}
            if all(s and not (s["kv_blocks_used"] or s["num_held_kv"] or s["num_running"]) for s in stats.values()):
                break
            assert time.monotonic() < deadline, stats
            time.sleep(0.2)
        assert stats["prefill"]["grammar_seconds_total"] > 0 and stats["decode"]["grammar_seconds_total"] > 0
