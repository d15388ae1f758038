"""The server under test as a subprocess: `tidal serve`, `tidal sim`, or a peer such as vLLM.

`ServerProcess(command, log_path, port)` owns one server's life:
- `start()` runs the command in a process group of its own (its workers belong to it), output to
  `log_path`; `wait_ready()` polls until `/health` answers 200 and, when asked, `/v1/models` names
  a model and `/admin/workers` lists `num_workers` routable workers; a process that exits while it
  waits fails at once with its log's tail;
- `stop()` sends `stop_signal` (SIGINT: a tidal command stops its own workers) to the leader, or to
  the whole group (`signal_group`, for a peer that leaves its engine to its own signal), waits, and
  SIGKILLs whatever of the group is left; it is safe to call twice, and `with` calls it;
- `wait_idle()`: until no worker of a tidal server has open requests (cut streams are aborted
  server-side before the next measurement).
`tidal_command(args)` is `python -m tidal.cli ARGS`, and `checkout_env()` the environment that makes
the child import this checkout's `tidal`. `tidal.runtime.ports.free_port()` picks the port.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

CHECKOUT = Path(__file__).resolve().parents[2]
"""The folder that holds this `tidal` package (the repository in a checkout)."""



def checkout_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's) with this checkout first on PYTHONPATH; what was on it stays
    reachable (the GPU box's wheels, installed under a --target folder)."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = str(CHECKOUT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def tidal_command(args: list[str], python: str = sys.executable) -> list[str]:
    """`python -m tidal.cli ARGS`."""
    return [python, "-m", "tidal.cli", *args]


class ServerStartError(RuntimeError):
    """The server exited, or did not become ready in time."""


class ServerProcess:
    def __init__(self, command: list[str], log_path: str | Path, port: int, *, env: dict[str, str] | None = None,
                 name: str | None = None, stop_signal: int = signal.SIGINT, signal_group: bool = False) -> None:
        self.command, self.log_path, self.port = command, Path(log_path), port
        self.env = checkout_env() if env is None else env
        self.name = name or Path(command[0]).name
        self.stop_signal, self.signal_group = stop_signal, signal_group
        self.proc: subprocess.Popen | None = None
        self.start_s = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command, env=self.env, cwd=CHECKOUT, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        self._started = time.monotonic()

    def wait_ready(self, timeout_s: float = 420.0, num_workers: int | None = None,
                   need_model: bool = False) -> str | None:
        """Polls until ready; returns the first model's id when `need_model`. `num_workers`: so many
        routable workers, since a point measured on fewer GPUs than the deployment names would be wrong."""
        deadline = time.monotonic() + timeout_s
        with httpx.Client(base_url=self.url, timeout=5.0) as client:
            while True:
                if self.proc.poll() is not None:
                    raise ServerStartError(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}:\n"
                                           + self.log_tail())
                with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, IndexError):
                    if client.get("/health").status_code == 200 and self._workers_up(client, num_workers):
                        model = client.get("/v1/models").json()["data"][0]["id"] if need_model else None
                        self.start_s = time.monotonic() - self._started
                        return model
                if time.monotonic() > deadline:
                    self.stop()
                    raise ServerStartError(f"{self.name} not ready after {timeout_s:.0f} s; see {self.log_path}:\n"
                                           + self.log_tail())
                time.sleep(0.5)

    @staticmethod
    def _workers_up(client: httpx.Client, num_workers: int | None) -> bool:
        if num_workers is None:
            return True
        table = client.get("/admin/workers").json()["workers"]
        return sum(1 for w in table if not w.get("draining")) >= num_workers

    def start_and_wait(self, **ready) -> float:
        """`start()` then `wait_ready(**ready)`; the seconds it took."""
        self.start()
        self.wait_ready(**ready)
        return self.start_s

    def stop(self, timeout_s: float = 60.0) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                if self.signal_group:
                    os.killpg(proc.pid, self.stop_signal)
                else:
                    proc.send_signal(self.stop_signal)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=timeout_s)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # the leader's leftovers, or all of it if it hung
        proc.wait()

    def wait_idle(self, timeout_s: float = 20.0) -> None:
        """Until no worker has open requests, at most `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                table = httpx.get(self.url + "/admin/workers", timeout=2).json()["workers"]
                if all(not w["open_requests"] for w in table):
                    return
            time.sleep(0.5)

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
