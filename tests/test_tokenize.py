"""`/tokenize` and `/detokenize` in vLLM's shapes (`tidal.frontend.serving_tokenize`), and the
`--chat-template` a server can render chats with instead of the model's.

The app runs in-process over `ScriptedEngine` with the embedded model's real tokenizer, so a chat's
tokenized ids can be compared with the ids the chat endpoint sends to the engine. These endpoints are
not part of OpenAI's API, so plain HTTP drives them; the chat side goes through the `openai` client.
"""

from __future__ import annotations

import httpx
import openai
import pytest
from test_frontend_unit import MODEL, ScriptedEngine, embedded_tokenizer, make_app

from tidal.tokenizer import load_chat_template

MESSAGES = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi <|im_end|> there, what is 2+2?"}]
TEMPLATE = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}[bot]{% endif %}"


@pytest.fixture
def tokenizer():
    return embedded_tokenizer()


@pytest.fixture
def engine(tokenizer) -> ScriptedEngine:
    return ScriptedEngine(tokenizer=tokenizer, max_model_len=256)


@pytest.fixture
async def http(engine):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=make_app(engine)), base_url="http://test") as c:
        yield c


def _openai(app) -> openai.AsyncOpenAI:
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
    return openai.AsyncOpenAI(base_url="http://test/v1", api_key="unused", http_client=http, max_retries=0)


async def test_tokenize_a_prompt(http, tokenizer):
    prompt = "The capital of France is Paris. 日本語 😀"
    reply = await http.post("/tokenize", json={"model": MODEL, "prompt": prompt})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["tokens"] == tokenizer.encode(prompt, add_special_tokens=True)
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == 256 and body["token_strs"] is None
    strs = (await http.post("/tokenize", json={"prompt": prompt, "return_token_strs": True,
                                               "add_special_tokens": False})).json()["token_strs"]
    assert strs == tokenizer.convert_ids_to_tokens(tokenizer.encode(prompt, add_special_tokens=False))


async def test_tokenized_chat_is_what_the_chat_endpoint_sends(engine, http):
    app = make_app(engine)
    async with _openai(app) as client, httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                                         base_url="http://test") as local:
        reply = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3)
        sent = engine.requests[-1].prompt_token_ids
        tokenized = (await local.post("/tokenize", json={"model": MODEL, "messages": MESSAGES})).json()
    assert tokenized["tokens"] == list(sent) and tokenized["count"] == reply.usage.prompt_tokens
    # `<|im_end|>` typed by the user stays text, as in the chat request itself
    im_end = engine.tokenizer.backend.token_to_id("<|im_end|>")
    assert tokenized["tokens"].count(im_end) == 2  # the two turns' own ends, not the user's text
    without = (await http.post("/tokenize", json={"messages": MESSAGES, "add_generation_prompt": False})).json()
    assert without["count"] < tokenized["count"] and tokenized["tokens"][:without["count"]] == without["tokens"]


async def test_detokenize_round_trips(http, tokenizer):
    text = "Hello there! naïve café, 你好 😀"
    tokens = (await http.post("/tokenize", json={"prompt": text, "add_special_tokens": False})).json()["tokens"]
    reply = await http.post("/detokenize", json={"model": MODEL, "tokens": tokens})
    assert reply.status_code == 200 and reply.json() == {"prompt": text}
    special = tokenizer.encode("<|im_start|>user", add_special_tokens=False)
    assert (await http.post("/detokenize", json={"tokens": special})).json()["prompt"] == "<|im_start|>user"
    assert (await http.post("/detokenize", json={"tokens": []})).json() == {"prompt": ""}


@pytest.mark.parametrize("path, body, status, param", [
    ("/tokenize", {"prompt": "x", "continue_final_message": True}, 400, "continue_final_message"),
    ("/tokenize", {"messages": [{"role": "user", "content": "x"}], "chat_template": "{{ 1 }}"}, 400,
     "chat_template"),
    ("/tokenize", {"messages": [{"role": "user", "content": "x"}], "add_special_tokens": True}, 400,
     "add_special_tokens"),
    ("/tokenize", {"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": {"messages": []}}, 400,
     "chat_template_kwargs"),
    ("/tokenize", {"messages": []}, 400, "messages"),
    ("/tokenize", {"prompt": 5}, 400, "prompt"),
    ("/tokenize", {"prompt": "x" * (256 * 32 + 1)}, 400, "prompt"),
    ("/tokenize", {"model": "other", "prompt": "x"}, 404, "model"),
    ("/tokenize", {}, 400, "prompt"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("/detokenize", {"tokens": [10**9]}, 400, "tokens"),
    ("/detokenize", {"tokens": [1] * 257}, 400, "tokens"),
    ("/detokenize", {"tokens": ["a"]}, 400, "tokens.0"),
    ("/detokenize", {"model": "other", "tokens": [1]}, 404, "model"),
    ("/detokenize", {"tokens": [1], "skip_special_tokens": True}, 400, "skip_special_tokens"),
])
async def test_bad_requests_name_the_field(http, path, body, status, param):
    reply = await http.post(path, json=body)
    assert reply.status_code == status, reply.text
    assert reply.json()["error"]["param"] == param


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"\xff\xfe"])
async def test_malformed_bodies_are_400(http, content):
    reply = await http.post("/tokenize", content=content)
    assert reply.status_code == 400 and reply.json()["error"]["message"]
    assert (await http.post("/tokenize", json={"prompt": "still serving"})).status_code == 200


# ---- --chat-template ---------------------------------------------------------------------------


@pytest.mark.parametrize("as_file", [False, True])
async def test_server_chat_template_replaces_the_models(engine, tokenizer, tmp_path, as_file):
    value = TEMPLATE
    if as_file:
        (tmp_path / "chat.jinja").write_text(TEMPLATE)
        value = str(tmp_path / "chat.jinja")
    app = make_app(engine, chat_template=value)
    messages = [{"role": "user", "content": "What is 2+2?"}]
    expected = tokenizer.encode("[user] What is 2+2?\n[bot]", add_special_tokens=False)
    async with _openai(app) as client, httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                                         base_url="http://test") as http:
        await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
        assert list(engine.requests[-1].prompt_token_ids) == expected
        tokenized = (await http.post("/tokenize", json={"messages": messages})).json()["tokens"]
        assert tokenized == expected
    assert tokenizer.chat_template != TEMPLATE  # the shared tokenizer keeps the model's own


def test_chat_template_values_that_are_neither_file_nor_template_are_refused(tmp_path):
    with pytest.raises(ValueError, match="neither a file nor a Jinja template"):
        load_chat_template(str(tmp_path / "missing.jinja"))
    with pytest.raises(ValueError, match="does not compile"):
        load_chat_template("{% for m in messages %}")
