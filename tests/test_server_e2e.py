"""End to end: `tidal serve` on the embedded SmolLM2-135M-Instruct (fp32, CPU), driven by the
official `openai` client. One server (module fixture) serves every test here.
"""

from __future__ import annotations

import signal
import subprocess
import time

import httpx
import openai
import pytest

from _server import group_is_gone, metrics, running_server, start_server

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    log = tmp_path_factory.mktemp("e2e") / "serve.log"
    with running_server(["--dtype", "float32"], log) as url:
        yield url


@pytest.fixture(scope="module")
def client(server_url):
    with openai.OpenAI(base_url=server_url + "/v1", api_key="unused", max_retries=0,
                       timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def tokenizer():
    from tidal.tokenizer import load_tokenizer

    return load_tokenizer(None)


def _chat_stream(client, **kwargs):
    return list(client.chat.completions.create(model=MODEL, stream=True, **kwargs))


def _assert_serving(client):
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0,
                                           max_tokens=12)
    assert "Paris" in reply.choices[0].message.content


# ---------------------------------------------------------------------------------------------


def test_models_and_health(server_url, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server_url + "/health").status_code == 200
    assert httpx.get(server_url + "/version").json()["version"]


def test_chat_greedy_answer(client):
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0,
                                           max_tokens=30)
    choice = reply.choices[0]
    assert choice.message.content == "The capital of France is Paris."
    assert choice.finish_reason == "stop"
    assert reply.id.startswith("chatcmpl-") and reply.model == MODEL
    usage = reply.usage
    assert usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_chat_streaming_equals_non_streaming(client):
    kwargs = dict(messages=[{"role": "user", "content": "Write one sentence about the sea."}],
                  temperature=0, max_tokens=24)
    whole = client.chat.completions.create(model=MODEL, **kwargs)
    chunks = _chat_stream(client, **kwargs)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_completions_string_and_token_id_prompts(client, tokenizer):
    prompt = "The three primary colors are"
    by_text = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=12)
    ids = tokenizer.encode(prompt, add_special_tokens=True)
    by_ids = client.completions.create(model=MODEL, prompt=ids, temperature=0, max_tokens=12)
    assert by_text.choices[0].text == by_ids.choices[0].text and by_text.choices[0].text
    assert by_text.usage.prompt_tokens == by_ids.usage.prompt_tokens == len(ids)
    assert by_text.id.startswith("cmpl-")
    streamed = client.completions.create(model=MODEL, prompt=prompt, temperature=0,
                                         max_tokens=12, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == by_text.choices[0].text


def test_stop_strings(client):
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0,
                                           max_tokens=30, stop=["Paris"])
    assert reply.choices[0].message.content == "The capital of France is "
    assert reply.choices[0].finish_reason == "stop"
    chunks = _chat_stream(client, messages=QUESTION, temperature=0, max_tokens=30,
                          stop=["France"])
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "The capital of " and chunks[-1].choices[0].finish_reason == "stop"
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0,
                                           max_tokens=30, stop="Paris",
                                           extra_body={"include_stop_str_in_output": True})
    assert reply.choices[0].message.content == "The capital of France is Paris"


def test_max_tokens_and_usage(client, tokenizer):
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0,
                                           max_tokens=7, extra_body={"ignore_eos": True})
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 7
    prompt = tokenizer.apply_chat_template([dict(m) for m in QUESTION], add_generation_prompt=True)
    assert reply.usage.prompt_tokens == len(tokenizer.encode(prompt, add_special_tokens=False))
    completion = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=20,
                                           temperature=0.8, seed=1, extra_body={"ignore_eos": True})
    assert completion.usage.completion_tokens == 20
    assert completion.choices[0].finish_reason == "length"


def test_include_usage_and_cached_tokens(client):
    messages = [{"role": "system", "content": "You are a helpful assistant. " * 8}, *QUESTION]
    first = client.chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                           max_tokens=5)
    chunks = _chat_stream(client, messages=messages, temperature=0, max_tokens=5,
                          stream_options={"include_usage": True})
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    usage = usage_chunk.usage
    assert usage.prompt_tokens == first.usage.prompt_tokens
    assert usage.completion_tokens == first.usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens >= 16  # the same prefix, cached
    assert usage.prompt_tokens_details.cached_tokens < usage.prompt_tokens


def test_logprobs(client):
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0,
                                           max_tokens=6, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.logprob <= 0
        # greedy: the chosen token is the most likely one
        assert entry.logprob == pytest.approx(max(t.logprob for t in entry.top_logprobs), abs=1e-4)
        assert bytes(entry.bytes).decode("utf-8", errors="replace")
    assert "".join(e.token for e in content) == reply.choices[0].message.content
    completion = client.completions.create(model=MODEL, prompt="The capital of France is",
                                           temperature=0, max_tokens=4, logprobs=2)
    lp = completion.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == completion.choices[0].text
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_errors_then_serving(server_url, client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=QUESTION)
    _assert_serving(client)

    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=-1)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=QUESTION, top_p=1.5)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", max_tokens=0)
    _assert_serving(client)

    max_model_len = client.models.list().data[0].model_extra["max_model_len"]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=max_model_len)
    assert str(max_model_len) in str(info.value)
    _assert_serving(client)

    r = httpx.post(server_url + "/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": [{"role": "user", "content": "x" * (9 << 20)}]})
    assert r.status_code == 413 and r.json()["error"]["message"]
    _assert_serving(client)


def test_abort_mid_stream_frees_blocks(server_url, client):
    _assert_serving(client)
    idle = metrics(server_url)
    assert idle["tidal_running_requests"] == 0
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Tell me a very long story."}],
        max_tokens=2000, stream=True, extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 5:
            break
    busy = metrics(server_url)
    assert busy["tidal_kv_blocks_used"] > idle["tidal_kv_blocks_used"]
    stream.close()
    deadline = time.monotonic() + 10  # generous: the CI machine may be shared
    while True:
        now = metrics(server_url)
        if (now["tidal_running_requests"] == 0
                and now["tidal_kv_blocks_used"] == idle["tidal_kv_blocks_used"]):
            break
        assert time.monotonic() < deadline, f"blocks not freed after abort: {now}"
        time.sleep(0.05)
    assert now['tidal_requests_total{status="abort"}'] >= 1
    _assert_serving(client)


def test_sigterm_stops_server_and_worker(tmp_path):
    """SIGTERM: the server stops, tells its worker to shut down, exits 0, leaves no process."""
    log_path = tmp_path / "serve.log"
    with start_server(["dummy:tiny-llama"], log_path) as server:  # leaving it kills what is left
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=30) == 0, log_path.read_text()[-3000:]
        assert "shutdown requested" in log_path.read_text()
        if not group_is_gone(server.pid):
            left = subprocess.run(["ps", "-o", "pid,args", "-g", str(server.pid)], capture_output=True, text=True)
            pytest.fail(f"processes left in the server's group:\n{left.stdout}")
