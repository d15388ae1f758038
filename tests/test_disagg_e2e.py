"""End to end: `tidal serve -f examples/*.yaml` with the embedded model, on the CPU.

- Greedy output through examples/disagg.yaml equals output through examples/agg.yaml, token for
  token, for prompts above and below the conditional-disaggregation threshold and for a
  multi-turn chat; the decisions show in `tidal_prefill_decisions_total`.
- A fault deployment (every KV pull delayed, low threshold) checks that an abort at each stage
  leaves no block used on any worker, and that a request whose prefill worker is killed
  mid-transfer moves (prefills again on the decode worker) and completes as if nothing happened.
Both example configs run with one torch thread per worker, so the two servers compute with the
same BLAS partitioning (float sums over a different thread split may round differently).
"""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import openai
import pytest

from _server import example_config, metrics, running_server

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
LONG_TEXT = ("The tide comes in twice a day, pulled by the moon and, to a lesser degree, the sun. "
             "Sailors learned to read it long before anyone could explain it. ") * 24


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("disagg")
    with running_server(["-f", str(example_config(tmp, "agg.yaml"))], tmp / "agg.log") as agg, \
            running_server(["-f", str(example_config(tmp, "disagg.yaml"))], tmp / "disagg.log") as disagg:
        yield agg, disagg


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)


def _chat(url: str, messages, max_tokens: int = 24) -> tuple[str, list[int]]:
    with _client(url) as c:
        reply = c.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=max_tokens,
                                          logprobs=True)
    return reply.choices[0].message.content, [t.token for t in reply.choices[0].logprobs.content]


def _decisions(url: str) -> tuple[float, float]:
    m = metrics(url)
    return (m.get('tidal_prefill_decisions_total{where="local"}', 0.0),
            m.get('tidal_prefill_decisions_total{where="remote"}', 0.0))


def _workers(url: str) -> list[dict]:
    return httpx.get(url + "/admin/workers", timeout=10).json()["workers"]


def _wait_all_free(url: str, timeout_s: float = 20) -> list[dict]:
    """Until every worker reports no used block, no held KV and no pull in flight."""
    deadline = time.monotonic() + timeout_s
    while True:
        workers = _workers(url)
        busy = [w for w in workers if w["stats"] is None or w["stats"]["kv_blocks_used"]
                or w["stats"]["num_held_kv"] or w["stats"]["num_waiting_for_kv"] or w["stats"]["num_running"]]
        if not busy:
            return workers
        assert time.monotonic() < deadline, f"blocks still used: {busy}"
        time.sleep(0.1)


def test_disagg_greedy_equals_agg_above_and_below_threshold(servers):
    agg, disagg = servers
    local0, remote0 = _decisions(disagg)
    short = [{"role": "user", "content": "What is the capital of France?"}]
    long = [{"role": "user", "content": LONG_TEXT + "\nWhat pulls the tide?"}]
    for messages in (short, long):
        assert _chat(disagg, messages) == _chat(agg, messages)
    local1, remote1 = _decisions(disagg)
    assert (local1 - local0, remote1 - remote0) == (1, 1)
    _wait_all_free(disagg)


def test_disagg_multi_turn_chat_equals_agg(servers):
    agg, disagg = servers
    history = [{"role": "system", "content": LONG_TEXT}]
    _, remote0 = _decisions(disagg)
    for question in ("What pulls the tide?", "How often does it come in?", "Who learned to read it?"):
        history.append({"role": "user", "content": question})
        text, tokens = _chat(agg, history)
        assert _chat(disagg, history) == (text, tokens)
        history.append({"role": "assistant", "content": text})
    local, remote = _decisions(disagg)
    # The first turn's long prompt goes remote; later turns hit the decode worker's cache.
    assert remote - remote0 == 1
    stats = {w["role"]: w["stats"] for w in _wait_all_free(disagg)}
    assert stats["decode"]["kv_transfers"] >= 2 and stats["decode"]["prefix_cache_hit_tokens"] > 0


def test_worker_metrics_and_admin_table(servers):
    _, disagg = servers
    roles = sorted(w["role"] for w in _workers(disagg))
    assert roles == ["decode", "prefill"]
    text = httpx.get(disagg + "/metrics").text
    for name in ("tidal_request_kv_transfer_seconds_bucket", "tidal_request_queue_seconds_bucket",
                 'tidal_worker_kv_blocks_used{role="decode",worker_id="decode-0"}'):
        assert name in text


# ---- faults ------------------------------------------------------------------------------------


@pytest.fixture()
def fault_server(tmp_path):
    # Restarts off: these tests follow a killed worker's requests, not its return (tests/test_chaos.py).
    path = example_config(tmp_path, "disagg.yaml", kv_transfer={"debug_delay_s": 3.0},
                   disaggregation={"local_prefill_threshold": 32}, restarts={"max_restarts": 0})
    with running_server(["-f", str(path)], tmp_path / "fault.log") as url:
        yield url, tmp_path / "fault.log"


def _stream_until(url: str, messages, n_tokens: int, max_tokens: int = 64):
    """Opens a stream and closes it after `n_tokens` content chunks (0: right away)."""
    with _client(url) as c:
        stream = c.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=max_tokens,
                                           stream=True)
        seen = 0
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                seen += 1
            if seen >= n_tokens:
                break
        stream.close()


def _leave_after(url: str, messages, timeout_s: float) -> None:
    """A non-streaming request whose client gives up after `timeout_s` (the server sees a disconnect)."""
    with _client(url) as c, pytest.raises(openai.APITimeoutError):
        c.with_options(timeout=timeout_s).chat.completions.create(model=MODEL, messages=messages, max_tokens=8)


def test_abort_at_every_stage_frees_every_worker(fault_server):
    url, _ = fault_server
    long = [{"role": "user", "content": LONG_TEXT}]
    medium = [{"role": "user", "content": LONG_TEXT[:600]}]
    # While prefilling (the first) and while queued behind it (the second).
    threads = [threading.Thread(target=_leave_after, args=(url, long, 1.0)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _wait_all_free(url)
    # While the KV moves (pulls take 3 s here): leave once the decode worker reports the pull.
    with _client(url) as c:
        stream = c.chat.completions.create(model=MODEL, messages=medium, temperature=0, max_tokens=16, stream=True)
        next(chunk for chunk in stream if chunk.choices and chunk.choices[0].delta.content)
        deadline = time.monotonic() + 2.7  # within the pull, with room for a busy box
        while not any(w["stats"]["num_waiting_for_kv"] for w in _workers(url)):
            assert time.monotonic() < deadline, "the decode worker never reported the pull"
            time.sleep(0.05)
        stream.close()
    _wait_all_free(url)
    # While decoding.
    _stream_until(url, medium, 5)
    _wait_all_free(url)
    assert metrics(url)['tidal_requests_total{status="abort"}'] >= 4
    assert _chat(url, medium, max_tokens=4)[0]


def test_prefill_worker_killed_mid_transfer(fault_server):
    url, log = fault_server
    prefill = next(w for w in _workers(url) if w["role"] == "prefill")
    messages = [{"role": "user", "content": LONG_TEXT[:600]}]
    moved0 = metrics(url)['tidal_request_migrations_total{reason="kv_transfer_failed"}']
    with _client(url) as c:
        stream = c.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=32, stream=True,
                                           extra_body={"ignore_eos": True})
        chunks = iter(stream)
        first = next(c for c in chunks if c.choices and c.choices[0].delta.content)
        assert first.choices[0].delta.content
        os.kill(prefill["pid"], signal.SIGKILL)  # the decode worker is pulling (3 s)
        # The pull fails; the request moves (prompt + its first token) and prefills on the decode worker.
        text = first.choices[0].delta.content + "".join(c.choices[0].delta.content or "" for c in chunks
                                                        if c.choices)
    assert metrics(url)['tidal_request_migrations_total{reason="kv_transfer_failed"}'] == moved0 + 1
    # The launcher reports the death and the router drops the worker; the server keeps serving:
    # with no prefill worker, the decode worker prefills itself.
    deadline = time.monotonic() + 10
    while any(w["role"] == "prefill" for w in _workers(url)):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert "was killed by SIGKILL; it stays down" in log.read_text()
    with _client(url) as c:
        again = c.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=32,
                                          extra_body={"ignore_eos": True})
    assert text == again.choices[0].message.content  # as if nothing had happened
    text, _ = _chat(url, [{"role": "user", "content": LONG_TEXT[:800] + " What pulls the tide?"}], max_tokens=8)
    assert text
    _wait_all_free(url)
