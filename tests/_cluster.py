"""Real etcd and NATS servers for tests, on loopback, on free ports, with temp data dirs.

`etcd_server` and `nats_server` are module-scoped fixtures yielding a `Service`: its `url`, and
`stop()` / `start()` / `restart()` that keep the port and the data dir (a restart test stops the
server under a running Tidal component and starts it again at the same address). Each server is
stopped at the end of the module.

The binaries come from Debian's `etcd-server` and `nats-server` packages (`.ci/run` installs
them). Without them the fixtures skip, unless `CI` is set: there a missing binary fails the test.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tidal.runtime.ports import free_port

# Debian puts nats-server in /usr/sbin, which a non-root PATH often lacks.
EXTRA_BIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/usr/local/bin")
START_TIMEOUT_S = 15.0


def find_binary(name: str, package: str = "etcd-server nats-server") -> str:
    """The binary's path; skip the test (fail under CI) if it is not installed (`package`: Debian's)."""
    path = shutil.which(name) or shutil.which(name, path=os.pathsep.join(EXTRA_BIN_DIRS))
    if path is None:
        message = f"`{name}` not found: install it (Debian: apt-get install {package})"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI must install it", pytrace=False)
        pytest.skip(message)
    return path


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class Service:
    """One server process; `start()` runs `argv` again at the same port and data dir."""

    def __init__(self, name: str, argv: list[str], port: int, url: str, log_path: Path,
                 ready: Callable[[], bool], data_dir: Path | None = None) -> None:
        self.name = name
        self.data_dir = data_dir
        self.argv = argv
        self.port = port
        self.url = url
        self.log_path = log_path
        self._ready = ready
        self._proc: subprocess.Popen | None = None

    def start(self) -> None:
        assert self._proc is None, f"{self.name} is running"
        log = open(self.log_path, "ab")
        self._proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._ready():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                log_tail = self.log_path.read_text()[-3000:]
                raise RuntimeError(f"{self.name} did not start; its log:\n{log_tail}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc = None
        while _port_open(self.port):  # the port is free again before a restart binds it
            time.sleep(0.05)

    def restart(self, down_s: float = 0.0, wipe: bool = False) -> None:
        """Stop, wait `down_s`, start at the same port; `wipe`: with an empty data dir (a new server
        that lost everything)."""
        self.stop()
        if wipe and self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)
        time.sleep(down_s)
        self.start()


def _etcd_healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=0.5) as response:
            return b'"health":"true"' in response.read()
    except OSError:
        return False


def make_etcd(tmp: Path) -> Service:
    binary = find_binary("etcd")
    port, peer_port = free_port(), free_port()
    url, peer_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{peer_port}"
    data_dir = tmp / "etcd-data"
    argv = [binary, "--name", "tidal-test", "--data-dir", str(data_dir),
            "--listen-client-urls", url, "--advertise-client-urls", url,
            "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"tidal-test={peer_url}", "--log-level", "warn"]
    return Service("etcd", argv, port, url, tmp / "etcd.log", lambda: _etcd_healthy(url), data_dir)


def make_nats(tmp: Path) -> Service:
    binary = find_binary("nats-server")
    port = free_port()
    argv = [binary, "-a", "127.0.0.1", "-p", str(port)]
    return Service("nats-server", argv, port, f"nats://127.0.0.1:{port}", tmp / "nats.log",
                   lambda: _port_open(port))


@pytest.fixture(scope="module")
def etcd_server(tmp_path_factory) -> Iterator[Service]:
    service = make_etcd(tmp_path_factory.mktemp("etcd"))
    service.start()
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture(scope="module")
def nats_server(tmp_path_factory) -> Iterator[Service]:
    service = make_nats(tmp_path_factory.mktemp("nats"))
    service.start()
    try:
        yield service
    finally:
        service.stop()
