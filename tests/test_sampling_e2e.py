"""End to end: the sampling fields on `tidal serve` with the KV router over two aggregated workers
(examples/agg_router.yaml, the embedded SmolLM2-135M-Instruct), driven by the official `openai` client,
streaming and not: penalties and logit_bias change what the model says, `n` choices share their prompt's
KV (computed once, on one worker), seeded choices differ yet reproduce, `best_of` picks the most likely,
`echo`, `min_tokens`, and aborting an `n` request frees every choice's blocks.
"""

from __future__ import annotations

import time
import uuid

import openai
import pytest
from _server import example_config, metrics, running_server

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
BLOCK_SIZE = 16  # CacheConfig's default, which the example keeps


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sampling")
    with running_server(["-f", str(example_config(tmp, "agg_router.yaml"))], tmp / "serve.log") as url:
        yield url


@pytest.fixture(scope="module")
def client(server_url):
    with openai.OpenAI(base_url=server_url + "/v1", api_key="unused", max_retries=0, timeout=300) as c:
        yield c


@pytest.fixture(scope="module")
def tokenizer():
    from tidal.tokenizer import load_tokenizer

    return load_tokenizer(None)


def _complete(client, stream: bool, **kwargs) -> list[str]:
    """Each choice's text, by index."""
    reply = client.completions.create(model=MODEL, stream=stream, **kwargs)
    if not stream:
        return [c.text for c in sorted(reply.choices, key=lambda c: c.index)]
    texts: dict[int, str] = {}
    for chunk in reply:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
    return [texts[i] for i in sorted(texts)]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("prompt, field, value", [
    ("Repeat after me: la la la la la la", "frequency_penalty", 2.0),  # greedy: " la" six times
    ("Repeat after me: la la la la la la", "repetition_penalty", 2.0),
    ("one two one two one two", "presence_penalty", 2.0),  # greedy: " two two two three two-"
])
def test_penalties_break_a_repetitive_greedy_output(client, stream, prompt, field, value):
    greedy = {"prompt": prompt, "max_tokens": 6, "temperature": 0}
    (plain,) = _complete(client, stream, extra_body={"ignore_eos": True}, **greedy)
    (penalized,) = _complete(client, stream, extra_body={"ignore_eos": True, field: value}, **greedy)
    assert len(set(penalized.split())) > len(set(plain.split())), (plain, penalized)
    assert len(set(plain.split())) <= 3, plain


@pytest.mark.parametrize("stream", [False, True])
def test_logit_bias_bans_and_forces_tokens(client, tokenizer, stream):
    greedy = {"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0, "extra_body": {"ignore_eos": True}}
    (plain,) = _complete(client, stream, **greedy)
    first = tokenizer.encode(plain, add_special_tokens=False)[0]
    (banned,) = _complete(client, stream, logit_bias={str(first): -100}, **greedy)
    assert tokenizer.encode(banned, add_special_tokens=False)[0] != first
    (forced_id,) = tokenizer.encode(" blue", add_special_tokens=False)
    (forced,) = _complete(client, stream, logit_bias={str(forced_id): 100}, **greedy)
    assert forced == " blue" * 4


def test_n_choices_share_the_prompts_kv_and_reproduce(server_url, client):
    # a prompt no earlier request had: only the template's opening can be cached before choice 0 runs
    messages = [{"role": "user", "content": f"Tell me about the number {uuid.uuid4().int % 10**12}."}]
    sampled = {"messages": messages, "max_tokens": 4, "temperature": 1.0, "seed": 11, "extra_body": {"ignore_eos": True}}
    hits_before = metrics(server_url).get("tidal_prefix_cache_hit_tokens_total", 0.0)
    reply = client.chat.completions.create(model=MODEL, n=4, **sampled)
    hits = metrics(server_url)["tidal_prefix_cache_hit_tokens_total"] - hits_before
    prompt_tokens = reply.usage.prompt_tokens
    # choices 1..3 found every full block of the prompt that choice 0 computed (the last token is always
    # computed): they ran on choice 0's worker, after it
    full_blocks = (prompt_tokens - 1) // BLOCK_SIZE * BLOCK_SIZE
    assert full_blocks >= BLOCK_SIZE
    assert hits == reply.usage.prompt_tokens_details.cached_tokens + 3 * full_blocks
    assert reply.usage.completion_tokens == 4 * 4
    texts = [c.message.content for c in reply.choices]
    assert [c.index for c in reply.choices] == [0, 1, 2, 3] and len(set(texts)) > 1  # seeds 11..14 differ
    again = client.chat.completions.create(model=MODEL, n=4, **sampled)
    assert [c.message.content for c in again.choices] == texts  # and reproduce
    streamed: dict[int, str] = {}
    for chunk in client.chat.completions.create(model=MODEL, n=4, stream=True, **sampled):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + (choice.delta.content or "")
    assert [streamed[i] for i in range(4)] == texts


def test_best_of_returns_the_most_likely_sample(client):
    sampled = {"prompt": "My favourite animal is the", "max_tokens": 4, "temperature": 1.0, "seed": 5,
                   "extra_body": {"ignore_eos": True}}
    samples = client.completions.create(model=MODEL, n=3, logprobs=0, **sampled)
    likelihood = {c.text: sum(c.logprobs.token_logprobs) for c in samples.choices}
    best = client.completions.create(model=MODEL, best_of=3, **sampled)  # seeds 5, 6, 7 as the samples'
    assert [c.text for c in best.choices] == [max(likelihood, key=likelihood.get)]
    assert best.choices[0].logprobs is None and best.usage.completion_tokens == 3 * 4
    two = client.completions.create(model=MODEL, best_of=3, n=2, logprobs=0, **sampled)
    assert [c.text for c in two.choices] == sorted(likelihood, key=likelihood.get, reverse=True)[:2]


@pytest.mark.parametrize("stream", [False, True])
def test_echo_prepends_the_prompt(client, tokenizer, stream):
    kwargs = {"max_tokens": 3, "temperature": 0, "echo": True, "extra_body": {"ignore_eos": True}}
    (text,) = _complete(client, stream, prompt="The capital of France is", **kwargs)
    (plain,) = _complete(client, stream, prompt="The capital of France is", max_tokens=3, temperature=0,
                         extra_body={"ignore_eos": True})
    assert text == "The capital of France is" + plain
    ids = tokenizer.encode("Once upon a time", add_special_tokens=False)
    (from_ids,) = _complete(client, stream, prompt=ids, **kwargs)
    assert from_ids.startswith("Once upon a time") and len(from_ids) > len("Once upon a time")


def test_min_tokens_holds_eos_back(client):
    question = [{"role": "user", "content": "What is the capital of France?"}]
    short = client.chat.completions.create(model=MODEL, messages=question, temperature=0, max_tokens=30)
    assert short.choices[0].finish_reason == "stop"
    longer = client.chat.completions.create(model=MODEL, messages=question, temperature=0, max_tokens=30,
                                            extra_body={"min_tokens": short.usage.completion_tokens + 3})
    assert longer.usage.completion_tokens >= short.usage.completion_tokens + 3


def test_unknown_fields_are_refused_and_the_server_keeps_serving(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       extra_body={"use_beam_search": True})
    assert caught.value.body["param"] == "use_beam_search"
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=2, store=False, service_tier="auto")
    assert reply.usage.completion_tokens >= 1


def test_aborting_an_n_stream_frees_every_choice(server_url, client):
    idle = metrics(server_url)
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Tell me a very long story."}], n=3,
        max_tokens=2000, stream=True, extra_body={"ignore_eos": True})
    seen = set()
    for chunk in stream:
        seen.update(c.index for c in chunk.choices)
        if seen == {0, 1, 2}:
            break
    assert metrics(server_url)["tidal_running_requests"] >= 1
    stream.close()
    deadline = time.monotonic() + 20  # generous: the machine may be shared
    while True:
        now = metrics(server_url)
        if now["tidal_running_requests"] == 0 and now["tidal_kv_blocks_used"] == idle["tidal_kv_blocks_used"]:
            break
        assert time.monotonic() < deadline, f"blocks not freed after abort: {now}"
        time.sleep(0.1)
    assert now['tidal_requests_total{status="abort"}'] - idle.get('tidal_requests_total{status="abort"}', 0) == 3
