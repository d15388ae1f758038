"""What a serving fleet did over a run, sampled from outside: a thread polls the server every second.

`FleetPoller(url, frontend_pid=...)`, used as a context manager around a run, samples
`/admin/workers` (workers by role, draining ones apart, and each worker's engine counters and
process CPU), the planner's target pool sizes and each API server process's CPU (`/metrics`), and the
frontend process's CPU; sample times are `time.perf_counter()` values. `engine_summary(samples, t0,
t1)` turns the samples inside a window into where the time went: per worker its busy share, CPU, step
time, decode batch, tokens/s and KV pulls, and the serving tier's CPU.
"""

from __future__ import annotations

import contextlib
import threading
import time

import httpx

from tidal.bench.procs import process_cpu_s

ENGINE_COUNTERS = ("steps_total", "step_seconds_total", "prefill_tokens_total", "decode_seqs_total",
                   "generation_tokens", "kv_transfers", "kv_transfer_seconds", "kv_transfer_bytes")
ENGINE_GAUGES = ("num_running", "num_waiting", "num_waiting_for_kv")


class FleetPoller:
    """A thread that samples the fleet every second: workers by role (draining ones apart), the
    planner's targets, each worker's engine counters (`/admin/workers`) and the frontend process's
    CPU time. Times are `time.perf_counter()` values; the caller shifts them to the run's start."""

    def __init__(self, url: str, interval_s: float = 1.0, frontend_pid: int | None = None):
        self.url, self.interval_s, self.frontend_pid = url, interval_s, frontend_pid
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> FleetPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=2) as client:
            while not self._stop.is_set():
                with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                    self.samples.append(self._sample(client))
                self._stop.wait(self.interval_s)

    def _sample(self, client: httpx.Client) -> dict:
        now = time.perf_counter()
        cpu_s = process_cpu_s(self.frontend_pid)
        workers = client.get("/admin/workers").json()["workers"]
        roles: dict[str, int] = {}
        engines = {}
        for w in workers:
            key = f"{w['role']}-draining" if w["draining"] else w["role"]
            roles[key] = roles.get(key, 0) + 1
            if w.get("stats"):
                engines[w["worker_id"]] = {"role": w["role"], "cpu_s": process_cpu_s(w.get("pid")),
                                           **{k: w["stats"].get(k, 0) for k in ENGINE_COUNTERS + ENGINE_GAUGES}}
        targets = {}
        api_cpu_s = {}  # API server processes' own CPU counters (several API servers)
        for line in client.get("/metrics").text.splitlines():
            if line.startswith("tidal_planner_target_workers{"):
                role = line.split('role="', 1)[1].split('"', 1)[0]
                targets[role] = float(line.rsplit(" ", 1)[1])
            elif line.startswith("tidal_frontend_process_cpu_seconds_total{"):
                index = line.split('frontend="', 1)[1].split('"', 1)[0]
                api_cpu_s[f"api{index}"] = float(line.rsplit(" ", 1)[1])
        return {"t": now, "workers": roles, "targets": targets, "engines": engines, "frontend_cpu_s": cpu_s,
                "api_cpu_s": api_cpu_s}


def engine_summary(samples: list[dict], t0: float, t1: float) -> dict:
    """Where the time went in [t0, t1] (run-relative seconds), from the poller's samples: per worker
    its busy share (engine step time / wall), its process's CPU use, mean step time, decode batch and running requests,
    prefill and output tokens/s, KV pulls/s and mean pull time; and the frontend process's CPU use
    (1.0 = one core). A worker seen at both ends only (a flipped one keeps its counters)."""
    inside = [s for s in samples if t0 <= s["t"] <= t1]
    if len(inside) < 2:
        return {}
    first, last = inside[0], inside[-1]
    span = last["t"] - first["t"]
    workers = {}
    for wid, end in last["engines"].items():
        begin = first["engines"].get(wid)
        if begin is None or span <= 0:
            continue
        d = {k: end[k] - begin[k] for k in ENGINE_COUNTERS}
        steps = d["steps_total"]
        gauges = [s["engines"][wid] for s in inside if wid in s["engines"]]
        workers[wid] = {
            "role": end["role"], "busy": round(d["step_seconds_total"] / span, 3),
            "cpu": round((end["cpu_s"] - begin["cpu_s"]) / span, 3)
            if end["cpu_s"] is not None and begin["cpu_s"] is not None else None,
            "step_ms": round(1000 * d["step_seconds_total"] / steps, 2) if steps else None,
            "decode_batch": round(d["decode_seqs_total"] / steps, 1) if steps else None,
            "prefill_tok_s": round(d["prefill_tokens_total"] / span),
            "output_tok_s": round(d["generation_tokens"] / span),
            "pulls_per_s": round(d["kv_transfers"] / span, 2),
            "pull_ms": round(1000 * d["kv_transfer_seconds"] / d["kv_transfers"], 2) if d["kv_transfers"] else None,
            "pull_gb_s": round(d["kv_transfer_bytes"] / d["kv_transfer_seconds"] / 1e9, 1)
            if d["kv_transfer_seconds"] > 0 else None,
            **{f"{g}_mean": round(sum(x[g] for x in gauges) / len(gauges), 1) for g in ENGINE_GAUGES}}
    cpu = (last["frontend_cpu_s"] - first["frontend_cpu_s"]) / span if (
        span > 0 and first.get("frontend_cpu_s") is not None and last.get("frontend_cpu_s") is not None) else None
    # The serve process (launcher; with one API server also the frontend) and each API server process.
    per_process = {"serve": cpu} if cpu is not None else {}
    for name, end in last.get("api_cpu_s", {}).items():
        begin = first.get("api_cpu_s", {}).get(name)
        if begin is not None and span > 0:
            per_process[name] = (end - begin) / span
    total = sum(per_process.values()) if per_process else None
    return {"span_s": round(span, 1), "frontend_cpu": round(total, 3) if total is not None else None,
            "frontend_cpu_max": round(max(per_process.values()), 3) if per_process else None,
            "frontend_cpu_by_process": {k: round(v, 3) for k, v in per_process.items()}, "workers": workers}
