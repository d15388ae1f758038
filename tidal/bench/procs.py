"""CPU accounting of the processes a benchmark runs, from Linux's /proc.

What a CPU figure needs: a process's (or one thread's) user + system seconds so far, the tree of
processes under a server (its workers, its API servers), each process's cores over a window and
its CPU microseconds per streamed token summed by role, the whole machine's busy cores (a shared
box: the cores that went to other processes make a row untrustworthy), and the machine itself.
Every reader returns None or 0 for a process that is gone: processes come and go during a run.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SIM_WORKER_NAME = "tidal-sim-wkr"
"""`tidal.sim.workers.SIM_PROCESS_NAME` as /proc/PID/comm shows it (a benchmark may not import the simulator)."""


def _stat_fields(path: str) -> list[str]:
    """The fields of a /proc stat file after the command name (field 3 on is index 0 on)."""
    return Path(path).read_text().rsplit(")", 1)[1].split()


def cpu_times(pid: int, tid: int | None = None) -> tuple[float, float]:
    """(user, system) CPU seconds of a process, or of one of its threads; raises OSError once it is gone."""
    fields = _stat_fields(f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat")
    return int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS  # utime, stime (fields 14, 15)


def process_cpu_s(pid: int | None) -> float | None:
    """User + system CPU seconds of one process so far, None if unknown or gone."""
    if pid is None:
        return None
    try:
        return sum(cpu_times(pid))
    except (OSError, IndexError, ValueError):
        return None


def cpu_seconds(pids: list[int] | int) -> float:
    """User + system CPU seconds of these processes so far (one that is gone counts 0)."""
    return sum(process_cpu_s(pid) or 0.0 for pid in ([pids] if isinstance(pids, int) else pids))


def cmdline(pid: int) -> str | None:
    """A live process's command line (None once it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None


def descendants(root: int) -> dict[int, str]:
    """Every live process under `root` (not itself): pid -> command line."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parents[int(entry)] = int(_stat_fields(f"/proc/{entry}/stat")[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = {}, [root]
    while frontier:
        parent = frontier.pop()
        for pid in (p for p, pp in parents.items() if pp == parent):
            command = cmdline(pid)
            if command is not None:
                found[pid] = command
                frontier.append(pid)
    return found


def sim_process_roles(root: int) -> dict[int, str]:
    """`tidal sim`'s processes by role: pid -> "serving" or "sim-worker" (multiprocessing's tracker left out)."""
    roles = {root: "serving"}
    for pid, command in descendants(root).items():
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        if comm == SIM_WORKER_NAME:
            roles[pid] = "sim-worker"
        elif "resource_tracker" not in command:
            roles[pid] = "serving"
    return roles


def cpu_by_role(roles: dict[int, str], cpu0: dict[int, float], cpu1: dict[int, float], span_s: float,
                tok_s: float | None, expected: tuple[str, ...] = ()) -> tuple[list[dict], dict]:
    """Each process's cores and CPU microseconds per streamed token over a window, and per role (those
    seen, and every `expected` one) the sum `ROLE_cores`, the busiest `ROLE_cores_max` and `ROLE_cpu_us_per_token`."""
    rows, totals = [], {}
    for pid, role in roles.items():
        cores = (cpu1[pid] - cpu0[pid]) / span_s
        rows.append({"pid": pid, "role": role, "cores": cores,
                     "cpu_us_per_token": 1e6 * cores / tok_s if tok_s else None})
    for role in dict.fromkeys([*roles.values(), *expected]):
        cores = [row["cores"] for row in rows if row["role"] == role]
        totals[f"{role}_cores"], totals[f"{role}_cores_max"] = sum(cores), max(cores, default=0.0)
        totals[f"{role}_cpu_us_per_token"] = 1e6 * sum(cores) / tok_s if tok_s else None
    return rows, totals


# ---- the whole machine ------------------------------------------------------------------------------------
def busy_cpu_s() -> float:
    """CPU seconds the machine spent busy so far (all but idle and iowait), summed over its cores."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v) - v[3] - (v[4] if len(v) > 4 else 0)) / CLOCK_TICKS


def group_cpu_s(pgid: int | None) -> float:
    """CPU seconds of every live process in process group `pgid` (a server and its workers)."""
    if pgid is None:
        return 0.0
    total = 0.0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = _stat_fields(f"/proc/{entry}/stat")
                if int(fields[2]) == pgid:
                    total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
            except (OSError, IndexError, ValueError):
                continue
    return total


class HostCpuMeter:
    """Cores over a window: the machine's busy ones, a server's process group, this process (the
    client), and the rest (`cpu_foreign_cores`: other people's work on a shared box)."""

    def __init__(self, server_pgid: int | None) -> None:
        self.server_pgid = server_pgid
        self.t0 = time.monotonic()
        self.busy0, self.server0, self.client0 = busy_cpu_s(), group_cpu_s(server_pgid), time.process_time()

    def stop(self) -> dict[str, float]:
        span = time.monotonic() - self.t0
        busy = busy_cpu_s() - self.busy0
        server = group_cpu_s(self.server_pgid) - self.server0
        client = time.process_time() - self.client0
        return {"cpu_busy_cores": busy / span, "cpu_server_cores": server / span, "cpu_client_cores": client / span,
                # processes that exited during the window are not counted as the server's; clamp at 0
                "cpu_foreign_cores": max(0.0, busy - server - client) / span}


def wait_host_idle(max_wait_s: float, threshold_cores: float, quiet_s: float = 3.0) -> float:
    """Waits (at most `max_wait_s`) until the machine's busy cores stay under `threshold_cores` for
    `quiet_s` seconds; returns the seconds waited."""
    started = time.monotonic()
    quiet = 0.0
    while time.monotonic() - started < max_wait_s:
        busy0, t0 = busy_cpu_s(), time.monotonic()
        time.sleep(1.0)
        load = (busy_cpu_s() - busy0) / (time.monotonic() - t0)
        quiet = quiet + 1.0 if load < threshold_cores else 0.0
        if quiet >= quiet_s:
            break
    return time.monotonic() - started


def machine_info() -> dict:
    """Cores, CPU model and its vector extensions, memory, platform and Python."""
    info: dict = {"nproc": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name:"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
            if line.startswith("Flags:"):
                flags = line.split(":", 1)[1].split()
                info["isa"] = sorted(f for f in flags if f.startswith(("avx512", "amx")) or f == "avx2")
    except (OSError, subprocess.TimeoutExpired):
        pass
    info["nproc_cmd"] = len(os.sched_getaffinity(0))
    try:
        with open("/proc/meminfo") as f:
            info["mem_gib"] = round(int(next(line for line in f if line.startswith("MemTotal")).split()[1]) / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        pass
    return info
