"""End to end: `tidal serve` with API keys on two API server processes over a disaggregated pair of
workers (embedded model, CPU; KV over the zmq backend's TCP server, health endpoints on), driven by the
official `openai` client. Every API server process enforces the keys; /tokenize counts what a chat
bills; and nothing the deployment listens on is reachable beyond loopback: the sockets of the server's
process group are read from /proc/net/tcp{,6} (TCP LISTEN) and /proc/PID/fd.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from _server import REPO_ROOT, start_server

from tidal.runtime.ports import free_port

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
KEYS = ("sk-e2e-first", "sk-e2e-second")
HEADER = "x-tidal-api-server"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
MAX_TRIES = 40
WILDCARDS = {"0.0.0.0", "::"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(the ServerProcess, the workers' health ports)."""
    tmp = tmp_path_factory.mktemp("security")
    data = yaml.safe_load((REPO_ROOT / "examples" / "disagg.yaml").read_text())
    data["kv_transfer"]["backend"] = "zmq"  # a TCP listener, which must bind loopback
    health_ports = []
    for worker in data["workers"]:
        worker["num_threads"] = 1
        worker["health_port"] = free_port()
        health_ports.append(worker["health_port"])
    config = tmp / "disagg.yaml"
    config.write_text(yaml.safe_dump(data))
    args = ["-f", str(config), "--api-servers", "2", *(f"--api-key={key}" for key in KEYS)]
    with start_server(args, tmp / "serve.log") as proc:
        yield proc, health_ports


def _until_both_answer(url: str, key: str, expect: int) -> None:
    """Fresh connections until both API server processes have answered `expect`."""
    seen = set()
    for _ in range(MAX_TRIES):
        with httpx.Client(timeout=60) as http:
            reply = http.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert reply.status_code == expect, reply.text
        seen.add(reply.headers[HEADER])
        if seen == {"0", "1"}:
            return
    pytest.fail(f"only API servers {seen} answered in {MAX_TRIES} requests")


def test_every_api_server_process_enforces_the_keys(server):
    proc, _ = server
    _until_both_answer(proc.url, "sk-wrong", 401)
    _until_both_answer(proc.url, KEYS[1], 200)
    assert httpx.get(proc.url + "/health").status_code == 200  # probes need no key


def test_openai_client_with_and_without_the_key(server):
    proc, _ = server
    with openai.OpenAI(base_url=proc.url + "/v1", api_key="sk-wrong", max_retries=0, timeout=120) as client:
        with pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4)
        with pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4, stream=True)
    with openai.OpenAI(base_url=proc.url + "/v1", api_key=KEYS[0], max_retries=0, timeout=120) as client:
        reply = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=12, temperature=0)
        assert "Paris" in reply.choices[0].message.content
        chunks = list(client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=12,
                                                     temperature=0, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
            reply.choices[0].message.content
        tokenized = httpx.post(proc.url + "/tokenize", json={"model": MODEL, "messages": QUESTION},
                               headers={"Authorization": f"Bearer {KEYS[0]}"}, timeout=60).json()
        assert tokenized["count"] == reply.usage.prompt_tokens


def _group_pids(pgid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
            if int(fields[2]) == pgid:
                pids.append(int(entry))
    return pids


def _address(hex_address: str) -> tuple[str, int]:
    host, port = hex_address.split(":")
    raw = bytes.fromhex(host)
    if len(raw) == 4:
        return ".".join(str(b) for b in raw[::-1]), int(port, 16)
    words = [raw[i:i + 4][::-1] for i in range(0, 16, 4)]  # four little-endian 32-bit words
    return str(ipaddress.IPv6Address(b"".join(words))), int(port, 16)


def listening_sockets(pgid: int) -> list[tuple[str, int, int]]:
    """(address, port, pid) of every TCP socket in LISTEN state that a process of the group holds."""
    listening = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            parts = line.split()
            if parts[3] == "0A":  # TCP_LISTEN
                listening[parts[9]] = _address(parts[1])
    found = []
    for pid in _group_pids(pgid):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            inode = target[len("socket:["):-1] if target.startswith("socket:[") else None
            if inode in listening:
                found.append((*listening[inode], pid))
    return found


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's /proc")
def test_nothing_listens_beyond_loopback(server):
    proc, health_ports = server
    sockets = listening_sockets(proc.pid)
    assert len(_group_pids(proc.pid)) >= 5  # the launcher, two API servers, two workers
    assert not [s for s in sockets if s[0] in WILDCARDS], sockets
    assert all(address.startswith("127.") or address == "::1" for address, _, _ in sockets), sockets
    ports = {port for _, port, _ in sockets}
    assert proc.port in ports and set(health_ports) <= ports
    # beyond the API port and the health ports: the zmq KV servers, also on loopback
    assert ports - {proc.port, *health_ports}, sockets
