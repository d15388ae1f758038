"""Several API server processes on one port (`tidal serve --api-servers 2`), on the embedded model.

Each response names the process that served it (`x-tidal-api-server`); a fresh connection per
request lets the kernel spread requests over both processes, and each test checks that both
answered. Greedy answers equal a one-process server's; a session's turns stay on one worker
whichever process takes them; /metrics counts every process; a killed process's requests stop on
the workers, the other process keeps serving, and the killed one comes back.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests._server import example_config, metrics, running_server

pytestmark = pytest.mark.slow

HEADER = "x-tidal-api-server"
PROMPTS = ["What is the capital of France?", "Name three colours.", "Count from one to five."]
LONG_PROMPT = "Summarise this: " + " ".join(f"sentence {i} is about the sea and the tide." for i in range(70))
MAX_TRIES = 40


def chat(url: str, content: str, max_tokens: int = 16, session: str | None = None) -> tuple[str, str]:
    """One greedy chat request on a fresh connection: (text, the API server that answered)."""
    headers = {"x-session-id": session} if session else {}
    body = {"model": "SmolLM2-135M-Instruct", "temperature": 0, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": content}]}
    with httpx.Client(timeout=120) as client:
        reply = client.post(url + "/v1/chat/completions", json=body, headers=headers)
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["message"]["content"], reply.headers.get(HEADER, "")


def answers_from_both(url: str, prompt: str, **kw) -> set[str]:
    """Sends `prompt` until both API servers have answered it; returns the distinct texts."""
    texts, servers = set(), set()
    for _ in range(MAX_TRIES):
        text, server = chat(url, prompt, **kw)
        texts.add(text)
        servers.add(server)
        if servers == {"0", "1"}:
            return texts
    pytest.fail(f"only API servers {servers} answered in {MAX_TRIES} requests")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, str]:
    """Greedy answers of a one-process server with one aggregated worker."""
    tmp = tmp_path_factory.mktemp("reference")
    config = example_config(tmp, "agg.yaml")
    with running_server(["-f", str(config), "--api-servers", "1"], tmp / "serve.log") as url:
        return {prompt: chat(url, prompt)[0] for prompt in [*PROMPTS, LONG_PROMPT]}


@pytest.fixture(scope="module")
def agg_router(tmp_path_factory):
    """Two aggregated workers, round-robin routing (so only a session pin keeps turns together),
    two API servers; yields (url, log path)."""
    tmp = tmp_path_factory.mktemp("agg_router")
    config = example_config(tmp, "agg_router.yaml", frontend={"router": "round_robin"})
    log = tmp / "serve.log"
    with running_server(["-f", str(config), "--api-servers", "2"], log) as url:
        yield url, log


def test_two_api_servers_answer_as_one_process(agg_router, reference):
    url, _ = agg_router
    for prompt in PROMPTS:
        assert answers_from_both(url, prompt) == {reference[prompt]}


def test_disaggregated_with_two_api_servers_answers_as_one_process(tmp_path, reference):
    config = example_config(tmp_path, "disagg.yaml")
    with running_server(["-f", str(config), "--api-servers", "2"], tmp_path / "serve.log") as url:
        for prompt in (PROMPTS[0], LONG_PROMPT):  # the long one prefills on the prefill worker
            assert answers_from_both(url, prompt) == {reference[prompt]}
        values = metrics(url)
        assert values['tidal_prefill_decisions_total{where="remote"}'] >= 1  # later: cached on the decode worker


def _prompt_tokens_by_worker(url: str) -> dict[str, int]:
    workers = httpx.get(url + "/admin/workers", timeout=10).json()["workers"]
    return {w["worker_id"]: w["stats"]["prompt_tokens"] for w in workers}


def test_session_stays_on_its_worker_whichever_api_server_takes_it(agg_router):
    url, _ = agg_router
    time.sleep(1.0)  # load reports are sent every 0.5 s
    before = _prompt_tokens_by_worker(url)
    kept = 'tidal_router_decisions_total{policy="session"}'
    kept_before = metrics(url).get(kept, 0.0)
    servers = set()
    history = "Hello."
    turns = 0
    for turn in range(MAX_TRIES):
        turns += 1
        text, server = chat(url, history, max_tokens=8, session="conversation-1")
        servers.add(server)
        history += f" {text} Tell me more, turn {turn}."
        if servers == {"0", "1"} and turn >= 3:
            break
    assert servers == {"0", "1"}
    time.sleep(1.5)
    after = _prompt_tokens_by_worker(url)
    grew = [worker for worker in after if after[worker] > before.get(worker, 0)]
    assert len(grew) == 1, (before, after)
    # Every turn after the first was routed by the pin, also the first one each process took.
    assert metrics(url)[kept] - kept_before == turns - 1


def test_metrics_add_up_across_api_servers(agg_router):
    url, _ = agg_router
    before = metrics(url)['tidal_requests_total{status="success"}']
    servers, sent = set(), 0
    while sent < 6 or servers != {"0", "1"}:
        assert sent < MAX_TRIES, f"only API servers {servers} answered"
        servers.add(chat(url, f"Say {sent}.", max_tokens=4)[1])
        sent += 1
    for _ in range(6):  # whichever process answers /metrics, it counts every process's requests
        values = metrics(url)
        assert values['tidal_requests_total{status="success"}'] == before + sent
    assert values["tidal_frontend_processes"] == 2
    assert values['tidal_frontend_process_cpu_seconds_total{frontend="0"}'] > 0
    assert values['tidal_frontend_process_cpu_seconds_total{frontend="1"}'] > 0


def _api_server_pids(log: Path) -> list[int]:
    found = re.findall(r"API server processes listen on \S+ \(pids ([\d, ]+)\)", log.read_text())
    return [int(pid) for pid in found[-1].split(", ")]


def _running_on_workers(url: str) -> int | None:
    """Requests running on the workers, as the answering API server's router last heard; None
    before it has every worker's first load report (a just-restarted API server)."""
    workers = httpx.get(url + "/admin/workers", timeout=10).json()["workers"]
    if any(w["stats"] is None for w in workers):
        return None
    return sum(w["stats"]["num_running"] for w in workers)


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_killed_api_server_stops_its_requests_and_comes_back(agg_router):
    url, log = agg_router
    pid = _api_server_pids(log)[0]
    body = {"model": "SmolLM2-135M-Instruct", "temperature": 0, "max_tokens": 1000, "ignore_eos": True,
            "stream": True, "messages": [{"role": "user", "content": "Write a long story."}]}
    client = None
    for _ in range(MAX_TRIES):  # a long stream held by API server 0
        client = httpx.Client(timeout=120)
        stream = client.stream("POST", url + "/v1/chat/completions", json=body)
        response = stream.__enter__()
        if response.headers[HEADER] == "0":
            break
        stream.__exit__(None, None, None)
        client.close()
    else:
        pytest.fail("API server 0 never took the stream")
    next(response.iter_lines())
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while not _gone(pid):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    for i in range(4):  # the other process serves at once
        assert chat(url, f"Still there {i}?", max_tokens=4)[1] == "1"
    deadline = time.monotonic() + 10  # the workers dropped the dead process's stream
    while (running := _running_on_workers(url)) is None or running > 0:
        assert time.monotonic() < deadline, "the killed API server's request still runs on a worker"
        time.sleep(0.2)
    client.close()
    deadline = time.monotonic() + 60
    while "API server 0 serves again" not in log.read_text():
        assert time.monotonic() < deadline, "API server 0 was not restarted"
        time.sleep(0.2)
    answers_from_both(url, PROMPTS[0])
    assert metrics(url)["tidal_frontend_processes"] == 2
    assert metrics(url)['tidal_api_server_restarts_total{api_server="0"}'] == 1
