"""Helpers for end-to-end tests: run `tidal serve ...` as a subprocess and wait until healthy."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: list[str], log_path: Path, command: str = "serve") -> tuple[subprocess.Popen, str]:
    """`python -m tidal.cli COMMAND ARGS --port P`, in its own process group; waits for /health."""
    port = free_port()
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "tidal.cli", command, *args, "--port", str(port)],
                            cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    log.close()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}; log {log_path}:\n{log_path.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        if time.monotonic() > deadline:
            stop_server(proc)
            pytest.fail(f"server not healthy after {STARTUP_TIMEOUT_S}s; log {log_path}")
        time.sleep(0.3)


def stop_server(proc: subprocess.Popen, sig: int = signal.SIGINT, timeout_s: float = 30) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


@contextlib.contextmanager
def running_server(args: list[str], log_path: Path, command: str = "serve") -> Iterator[str]:
    proc, url = start_server(args, log_path, command)
    try:
        yield url
    finally:
        stop_server(proc)


def group_is_gone(pgid: int, timeout_s: float = 10) -> bool:
    """True once no process of that process group is left."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


def example_config(tmp_path: Path, name: str, **changes) -> Path:
    """examples/NAME with one torch thread per worker (so equal configs compute equal floats) and
    `changes` merged into its sections; written under tmp_path."""
    data = yaml.safe_load((REPO_ROOT / "examples" / name).read_text())
    for worker in data["workers"]:
        worker["num_threads"] = 1
    for section, values in changes.items():
        data.setdefault(section, {}).update(values)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def metrics(url: str) -> dict[str, float]:
    values = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values
