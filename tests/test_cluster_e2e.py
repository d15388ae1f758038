"""Cluster mode end to end: real etcd and NATS (`tests/_cluster.py`), and `tidal frontend`, four
`tidal worker`s (2 prefill, 2 decode) and `tidal planner` as separate OS processes, on the CPU
with dummy:tiny-llama and one torch thread each.

- Greedy chat answers through the cluster (short prompts prefilled on the decode worker, long
  ones on a prefill worker, KV over the zmq backend's TCP server) equal the offline `LLM`'s.
- A worker sent SIGTERM while streams run on it finishes them (or they move): every stream gets the
  uninterrupted greedy text; it leaves etcd and the frontend's table; a worker started afterwards
  gets requests within 2 s of registering.
- A decode worker killed with SIGKILL while 20 streams run (about 10 on it): its lease lapses (3 s), the frontend
  moves its requests to the other decode worker, every stream completes with the uninterrupted
  greedy answer and no client sees an error; no KV block stays in use on the survivors.
- The planner, fed the frontend's observations over NATS with a TTFT target nobody meets, flips a
  decode worker to prefill through a frontend; the flip shows in etcd, in both frontends' tables
  (a second frontend runs beside the first) and in the planner's /metrics.
- etcd and then NATS restarted under the running cluster: no Tidal process restarts; requests sent
  meanwhile complete or fail fast, none hangs; afterwards the cluster serves and follows changes.
Every process is started in its own session and killed at the end, pass or fail.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import torch
import yaml

from tidal.runtime.ports import free_port

pytest_plugins = ("_cluster",)  # the etcd_server and nats_server fixtures
pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = "e2e"
MODEL = "dummy:tiny-llama"
ENGINE = {"dtype": "float32", "num_kv_blocks": 256, "seed": 1, "token_budget": 256}
LOCAL_PREFILL_THRESHOLD = 64
LONG_TEXT = "The tide comes in twice a day, pulled by the moon and the sun. " * 12
START_TIMEOUT_S = 90


class Processes:
    """The test's OS processes, each in its own session, all killed by `stop_all`."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, *args: str) -> subprocess.Popen:
        with open(self.tmp / f"{name}.log", "w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "tidal.cli", *args], cwd=REPO_ROOT, stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                    env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text()[-3000:]

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None and proc.returncode not in (0, -signal.SIGTERM):
                pytest.fail(f"{name} exited with {proc.returncode}:\n{self.log(name)}")

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the session: the process and anything it started
            proc.wait()


def until(predicate: Callable[[], object], timeout_s: float, what: str, procs: Processes | None = None):
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(httpx.HTTPError):
            value = predicate()
            if value:
                return value
        if procs is not None:
            procs.check_alive()
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:g}s waiting for {what}")
        time.sleep(0.2)


class Cluster:
    def __init__(self, procs: Processes, config: Path, etcd_url: str, frontend_url: str, second_url: str) -> None:
        self.procs = procs
        self.config = config
        self.etcd_url = etcd_url
        self.url = frontend_url
        self.second_url = second_url  # another frontend over the same workers (only the session test uses it)
        self.etcd = None  # the services (tests/_cluster.py), for the restart test
        self.nats = None

    def start_worker(self, worker_id: str, role: str) -> subprocess.Popen:
        return self.procs.start(worker_id, "worker", "--config", str(self.config), "--role", role,
                                "--worker-id", worker_id)

    def etcd_workers(self) -> dict[str, dict]:
        """worker id -> record, read through etcd's JSON gateway."""
        prefix = f"/tidal/{NAMESPACE}/workers/".encode()
        end = prefix[:-1] + bytes([prefix[-1] + 1])
        reply = httpx.post(f"{self.etcd_url}/v3/kv/range", timeout=5, json={
            "key": base64.b64encode(prefix).decode(), "range_end": base64.b64encode(end).decode()}).json()
        records = [yaml.safe_load(base64.b64decode(kv["value"])) for kv in reply.get("kvs", [])]
        return {r["worker_id"]: r for r in records}

    def frontend_workers(self, url: str | None = None) -> dict[str, dict]:
        reply = httpx.get((url or self.url) + "/admin/workers", timeout=5)
        return {w["worker_id"]: w for w in reply.json()["workers"]}

    def chat(self, content: str, max_tokens: int = 12, url: str | None = None, session: str | None = None) -> str:
        reply = httpx.post((url or self.url) + "/v1/chat/completions", timeout=60, json={
            "model": "tiny-llama", "messages": [{"role": "user", "content": content}], "temperature": 0,
            "max_tokens": max_tokens}, headers={"x-session-id": session} if session else {})
        assert reply.status_code == 200, reply.text
        return reply.json()["choices"][0]["message"]["content"]

    def metric(self, url: str, name: str) -> float:
        for line in httpx.get(url + "/metrics", timeout=5).text.splitlines():
            key, _, value = line.rpartition(" ")
            if key == name:
                return float(value)
        return 0.0


@pytest.fixture(scope="module")
def cluster(etcd_server, nats_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cluster-e2e")
    port = free_port()
    config = tmp / "cluster.yaml"
    config.write_text(yaml.safe_dump({
        "cluster": {"etcd": [etcd_server.url], "nats": nats_server.url, "namespace": NAMESPACE, "lease_ttl_s": 3},
        "model": MODEL, "engine": ENGINE,
        "frontend": {"host": "127.0.0.1", "port": port, "router": "round_robin"},
        "disaggregation": {"local_prefill_threshold": LOCAL_PREFILL_THRESHOLD},
        "worker": {"host": "127.0.0.1", "num_threads": 1},
        "observation_interval_s": 0.5,
    }))
    procs = Processes(tmp)
    try:
        second_port = free_port()
        procs.start("frontend", "frontend", "--config", str(config))
        procs.start("frontend2", "frontend", "--config", str(config), "--port", str(second_port))
        c = Cluster(procs, config, etcd_server.url, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{second_port}")
        c.etcd, c.nats = etcd_server, nats_server
        for worker_id, role in (("p0", "prefill"), ("p1", "prefill"), ("d0", "decode"), ("d1", "decode")):
            c.start_worker(worker_id, role)
        until(lambda: len(c.etcd_workers()) == 4, START_TIMEOUT_S, "4 workers in etcd", procs)
        until(lambda: httpx.get(c.url + "/health", timeout=2).status_code == 200, START_TIMEOUT_S,
              "the frontend's /health", procs)
        until(lambda: len(c.frontend_workers()) == 4, 30, "4 workers in the frontend", procs)
        until(lambda: len(c.frontend_workers(c.second_url)) == 4, 30, "4 workers in the second frontend", procs)
        yield c
    finally:
        procs.stop_all()
    assert all(p.poll() is not None for p in procs.procs.values())


def _offline_answers(contents: list[str], max_tokens: int = 12) -> list[str]:
    from tidal import LLM, SamplingParams

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: the same float sums
    try:
        with LLM(MODEL, **ENGINE) as llm:
            return [llm.chat([{"role": "user", "content": c}], SamplingParams(max_tokens=max_tokens, temperature=0))
                    .outputs[0].text for c in contents]
    finally:
        torch.set_num_threads(threads)


def test_greedy_answers_equal_offline(cluster):
    # The long prompts differ from their first token: each is prefilled remotely.
    contents = ["What is the capital of France?", "What pulls the tide?\n" + LONG_TEXT, "Name a colour.",
                "How often does the tide come in?\n" + LONG_TEXT]
    served = [cluster.chat(c) for c in contents]
    assert served == _offline_answers(contents)
    assert cluster.metric(cluster.url, 'tidal_prefill_decisions_total{where="remote"}') >= 2
    assert cluster.metric(cluster.url, 'tidal_prefill_decisions_total{where="local"}') >= 2
    records = cluster.etcd_workers()
    assert {w: r["role"] for w, r in records.items()} == {"p0": "prefill", "p1": "prefill", "d0": "decode",
                                                           "d1": "decode"}
    assert all(r["request_addr"].startswith("tcp://127.0.0.1:") and r["kv_addr"].startswith("tcp://127.0.0.1:")
               and r["event_addr"].startswith("nats:") and r["model_name"] == "tiny-llama" for r in records.values())


def test_a_session_stays_on_its_worker_whichever_frontend_takes_it(cluster):
    def prompt_tokens() -> dict[str, int]:
        time.sleep(1.2)  # load reports every 0.5 s
        return {w: (r.get("stats") or {}).get("prompt_tokens", 0) for w, r in cluster.frontend_workers().items()}

    kept = 'tidal_router_decisions_total{policy="session"}'
    before, kept_before = prompt_tokens(), cluster.metric(cluster.second_url, kept)
    for turn in range(4):  # the first turn on the first frontend, then the frontends take turns
        cluster.chat(f"Turn {turn}: what pulls the tide?", max_tokens=4,
                     url=cluster.url if turn % 2 == 0 else cluster.second_url, session="tide-chat")
    after = prompt_tokens()
    grew = [w for w in after if after[w] > before.get(w, 0)]
    assert len(grew) == 1, (before, after)
    # The second frontend routed both its turns by the pin the first one made (not by round-robin).
    assert cluster.metric(cluster.second_url, kept) - kept_before == 2


def test_sigterm_leaves_etcd_and_a_new_worker_gets_requests(cluster):
    # d1 is sent SIGTERM while streams run on it: it finishes them (or they move), none fails.
    contents = [f"Describe the sea, part {i}." for i in range(6)]
    expected = _offline_answers(contents, max_tokens=200)
    proc = cluster.procs.procs["d1"]
    with concurrent.futures.ThreadPoolExecutor(len(contents)) as pool:
        futures = [pool.submit(_stream, cluster.url, c, 200) for c in contents]
        until(lambda: (cluster.frontend_workers()["d1"].get("stats") or {}).get("num_running", 0) >= 1, 30,
              "streams running on d1", cluster.procs)
        proc.send_signal(signal.SIGTERM)
        served = [f.result(timeout=120) for f in futures]
    assert served == expected
    assert proc.wait(30) == 0
    until(lambda: "d1" not in cluster.etcd_workers(), 5, "d1 to leave etcd")
    until(lambda: "d1" not in cluster.frontend_workers(), 5, "d1 to leave the frontend")
    for content in ("Say something.", LONG_TEXT + "\nAnd then?"):
        assert cluster.chat(content)
    # A worker that registers gets work within 2 s of registering (its engine is loaded by then).
    cluster.start_worker("d2", "decode")
    until(lambda: "d2" in cluster.etcd_workers(), START_TIMEOUT_S, "d2 in etcd", cluster.procs)

    def d2_served() -> bool:
        cluster.chat("One more, please.", max_tokens=2)
        stats = (cluster.frontend_workers().get("d2") or {}).get("stats")
        return bool(stats and stats["generation_tokens"])

    until(d2_served, 2.0, "a request on d2 within 2 s of its registration")


def _stream(url: str, content: str, max_tokens: int) -> str:
    """A streamed greedy chat; the text, or an AssertionError naming what the client saw."""
    text = []
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=120, json={
            "model": "tiny-llama", "messages": [{"role": "user", "content": content}], "temperature": 0,
            "max_tokens": max_tokens, "stream": True}) as reply:
        assert reply.status_code == 200, reply.read()
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            assert "error" not in chunk, chunk
            text.append(chunk["choices"][0]["delta"].get("content") or "")
    return "".join(text)


def test_kill9_decode_worker_streams_migrate(cluster):
    decoders = [w for w, r in cluster.etcd_workers().items() if r["role"] == "decode"]
    assert len(decoders) == 2
    victim = decoders[0]
    contents = [f"Tell me a story about tide number {i}." for i in range(20)]
    expected = _offline_answers(contents, max_tokens=300)
    with concurrent.futures.ThreadPoolExecutor(len(contents)) as pool:
        futures = [pool.submit(_stream, cluster.url, c, 300) for c in contents]

        def running_on_victim() -> bool:
            return (cluster.frontend_workers()[victim].get("stats") or {}).get("num_running", 0) >= 1

        until(running_on_victim, 30, f"streams running on {victim}", cluster.procs)
        killed = cluster.procs.procs.pop(victim)  # an exit the liveness checks expect
        os.killpg(killed.pid, signal.SIGKILL)
        killed.wait()
        served = [f.result(timeout=120) for f in futures]
    assert served == expected
    assert cluster.metric(cluster.url, 'tidal_request_migrations_total{reason="worker_died"}') >= 1
    until(lambda: victim not in cluster.etcd_workers(), 10, f"{victim} to leave etcd")

    def no_blocks_in_use() -> bool:
        stats = [w.get("stats") or {} for w in cluster.frontend_workers().values()]
        return all(s.get("kv_blocks_used", 0) == 0 for s in stats)

    until(no_blocks_in_use, 10, "no KV block in use on the survivors")
    cluster.start_worker("d3", "decode")  # back to two decode workers for the planner test
    until(lambda: "d3" in cluster.frontend_workers(), START_TIMEOUT_S, "d3 in the frontend", cluster.procs)


def test_planner_flips_a_decode_worker_through_the_frontend(cluster, tmp_path):
    decoders = [w for w, r in cluster.etcd_workers().items() if r["role"] == "decode"]
    assert len(decoders) == 2
    port = free_port()
    planner_config = tmp_path / "planner.yaml"
    # A TTFT target nobody meets and an ITL target anybody does: prefill is in trouble, decode has
    # slack, so the reactive loop flips a decode worker (one of two; the minimum is one).
    cluster_section = yaml.safe_load(cluster.config.read_text())["cluster"]
    planner_config.write_text(yaml.safe_dump({"cluster": cluster_section, "planner": {
        "slo": {"ttft_ms": 0.001, "itl_ms": 100000}, "max_workers": 8, "min_decode": 1,
        "reactive_interval_s": 0.5, "predictive_interval_s": 3600, "host": "127.0.0.1", "port": port}}))
    cluster.procs.start("planner", "planner", "--config", str(planner_config), "--log-level", "debug")
    planner_url = f"http://127.0.0.1:{port}"
    until(lambda: httpx.get(planner_url + "/health", timeout=2).status_code == 200, 60,
          "the planner to hear the frontend", cluster.procs)

    def flipped() -> list[str]:
        cluster.chat("Quick question.", max_tokens=2)
        return [w for w in decoders if cluster.etcd_workers()[w]["role"] == "prefill"]

    [worker] = until(flipped, 30, "a flip of a decode worker", cluster.procs)
    # One frontend carried it out; the other follows etcd.
    for url in (cluster.url, cluster.second_url):
        until(lambda: cluster.frontend_workers(url)[worker]["role"] == "prefill", 5, f"the flip seen at {url}")
    assert cluster.metric(planner_url, 'tidal_planner_decisions_total{action="flip",reason="ttft_over_slo"}') >= 1
    until(lambda: cluster.metric(planner_url, "tidal_planner_flip_unavailable_seconds_count") >= 1, 5,
          "the flip in the planner's metrics")
    assert cluster.chat("Still there?")


def test_etcd_and_nats_restarts_need_no_tidal_restart(cluster):
    before = set(cluster.etcd_workers())
    pids = {name: p.pid for name, p in cluster.procs.procs.items() if p.poll() is None}

    def chat_fails_fast_or_works() -> None:
        started = time.monotonic()
        with contextlib.suppress(httpx.HTTPError):  # 503 or a refused stream is fine; a hang is not
            httpx.post(cluster.url + "/v1/chat/completions", timeout=60, json={
                "model": "tiny-llama", "messages": [{"role": "user", "content": "Still there?"}],
                "temperature": 0, "max_tokens": 4})
        assert time.monotonic() - started < 60

    cluster.etcd.restart(down_s=2.0)
    chat_fails_fast_or_works()
    until(lambda: set(cluster.etcd_workers()) == before, 30, "every worker back in etcd")
    cluster.nats.restart(down_s=1.0)
    chat_fails_fast_or_works()
    until(lambda: cluster.chat("Are you back?", max_tokens=4), 30, "a chat after both restarts")
    # Changes still flow: a new worker registers and the frontend sees it.
    cluster.start_worker("p9", "prefill")
    until(lambda: "p9" in cluster.frontend_workers(), START_TIMEOUT_S, "p9 in the frontend", cluster.procs)
    assert all(cluster.procs.procs[name].pid == pid and cluster.procs.procs[name].poll() is None
               for name, pid in pids.items())
