"""Helpers for end-to-end tests: run `tidal serve ...` as a subprocess (`tidal.bench.server`) and wait
until healthy; example configs; a server's metrics."""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tidal.bench.server import ServerProcess, ServerStartError, tidal_command
from tidal.runtime.ports import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 300


def start_server(args: list[str], log_path: Path, command: str = "serve") -> ServerProcess:
    """`python -m tidal.cli COMMAND ARGS --port P` (`tidal.bench.server.ServerProcess`: its own process
    group); waits for /health, and fails the test with the log's tail if it exits or hangs."""
    port = free_port()
    server = ServerProcess(tidal_command([command, *args, "--port", str(port)]), log_path, port,
                           name=f"tidal {command}")
    try:
        server.start_and_wait(timeout_s=STARTUP_TIMEOUT_S)
    except ServerStartError as exc:
        pytest.fail(str(exc))
    return server


@contextlib.contextmanager
def running_server(args: list[str], log_path: Path, command: str = "serve") -> Iterator[str]:
    """The server's URL while it runs; stopped (SIGINT, then the group killed) at the end."""
    with start_server(args, log_path, command) as server:
        yield server.url


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


_MODEL_LABEL = re.compile(r'model_name="[^"]*",?')


def metrics(url: str) -> dict[str, float]:
    """Sample name (with its labels) -> value; the request metrics' `model_name` label is left out of
    the names (summed over models: a server serves one)."""
    values: dict[str, float] = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            name = _MODEL_LABEL.sub("", name).replace(",}", "}").replace("{}", "")
            values[name] = values.get(name, 0.0) + float(value)
    return values
