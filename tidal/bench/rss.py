"""Resident memory (RSS) of a server's process tree over time, and its growth after a warm-up.

`RssSampler(root_pid)` owns the labels of the processes it has seen: `sample(worker_pids)` reads
every live process under the server (and the server itself) from /proc and names each by what it
is: `frontend` (the server's own process), a worker's id (from the router's worker table, so a
restarted worker keeps its label under a new pid), `sim-worker-N` (`tidal sim`'s worker processes),
`resource-tracker` (multiprocessing's), `child-N` for any other (an API server of `--api-servers`).
A label, once given to a pid, stays; numbers are given in the order processes are first seen.
`growth_rows(samples, warmup_s)` is pure: per label, RSS at the end of the warm-up, at the end, the
maximum and the growth in between (the figure a soak run is judged by: no growth after warm-up), and
how much of that growth is anonymous memory (`RssAnon`: heap; a leak shows there, where a KV cache
mapped from /dev/shm grows `RssShmem` as its blocks are first written, up to its size).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tidal.bench.procs import SIM_WORKER_NAME, descendants

MIB = 2**20


def rss_bytes(pid: int, part: str = "VmRSS") -> int | None:
    """A live process's resident set size (`VmRSS`), or one part of it (`RssAnon`: its heap and other
    private memory; `RssShmem`: shared memory it has touched, such as a KV cache mapped from /dev/shm),
    None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(part + ":"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        return None
    return None  # a zombie has no such line


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


@dataclass
class RssSample:
    time_s: float  # since the run began
    rss_bytes: dict[str, int]  # label -> RSS
    anon_bytes: dict[str, int] = field(default_factory=dict)  # label -> its RssAnon part (a leak grows here)


@dataclass
class RssSampler:
    root_pid: int
    labels: dict[int, str] = field(default_factory=dict)  # pid -> label, once given
    _counts: dict[str, int] = field(default_factory=dict)

    def label(self, pid: int, command: str, worker_pids: dict[int, str]) -> str:
        """The label of `pid` (given on first sight, kept after)."""
        if pid in worker_pids:  # a worker's id wins: the table may come after the first sight
            self.labels[pid] = worker_pids[pid]
        if pid not in self.labels:
            if pid == self.root_pid:
                self.labels[pid] = "frontend"
            elif "resource_tracker" in command:
                self.labels[pid] = "resource-tracker"
            else:
                kind = "sim-worker" if _comm(pid) == SIM_WORKER_NAME else "child"
                self.labels[pid] = f"{kind}-{self._counts.get(kind, 0)}"
                self._counts[kind] = self._counts.get(kind, 0) + 1
        return self.labels[pid]

    def sample(self, time_s: float, worker_pids: dict[int, str] | None = None) -> RssSample:
        """RSS of the root and every live process under it; `worker_pids`: pid -> worker id."""
        procs = {self.root_pid: "", **descendants(self.root_pid)}
        rss: dict[str, int] = {}
        anon: dict[str, int] = {}
        for pid, command in sorted(procs.items()):
            value = rss_bytes(pid)
            if value is not None:
                label = self.label(pid, command, worker_pids or {})
                rss[label] = rss.get(label, 0) + value  # a label's processes add up (a worker's TP ranks)
                anon[label] = anon.get(label, 0) + (rss_bytes(pid, "RssAnon") or 0)
        return RssSample(time_s, rss, anon)


def growth_rows(samples: list[RssSample], warmup_s: float) -> list[dict]:
    """Per label (in order of first appearance): RSS in MiB at the first sample at or after `warmup_s`,
    at the last sample, the maximum over the run, and the growth from warm-up end to end (MiB and %).
    A label absent at the warm-up's end (started later) counts from its first sample."""
    labels = list(dict.fromkeys(label for s in samples for label in s.rss_bytes))
    after = [s for s in samples if s.time_s >= warmup_s] or samples[-1:]
    rows = []
    for label in labels:
        seen = [s for s in after if label in s.rss_bytes]
        if not seen:
            continue
        start, end = seen[0].rss_bytes[label], seen[-1].rss_bytes[label]
        peak = max(s.rss_bytes[label] for s in samples if label in s.rss_bytes)
        anon_growth = seen[-1].anon_bytes.get(label, 0) - seen[0].anon_bytes.get(label, 0)
        rows.append({"process": label, "warmup_end_mib": round(start / MIB, 1), "end_mib": round(end / MIB, 1),
                     "max_mib": round(peak / MIB, 1), "growth_mib": round((end - start) / MIB, 1),
                     "growth_pct": round(100 * (end - start) / start, 1) if start else None,
                     "anon_growth_mib": round(anon_growth / MIB, 1), "present_at_end": label in samples[-1].rss_bytes})
    return rows


def format_rows(rows: list[dict]) -> str:
    """The growth table as aligned text."""
    head = (f"{'process':<18} {'warm-up end MiB':>15} {'end MiB':>9} {'max MiB':>9} {'growth MiB':>11} {'growth %':>9}"
            f" {'of it anon MiB':>15}")
    lines = [head, "-" * len(head)]
    for r in rows:
        pct = "-" if r["growth_pct"] is None else f"{r['growth_pct']:+.1f}"
        gone = "" if r["present_at_end"] else "  (gone)"
        lines.append(f"{r['process']:<18} {r['warmup_end_mib']:>15.1f} {r['end_mib']:>9.1f} {r['max_mib']:>9.1f} "
                     f"{r['growth_mib']:>+11.1f} {pct:>9} {r['anon_growth_mib']:>+15.1f}{gone}")
    return "\n".join(lines)
