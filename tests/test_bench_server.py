"""The benchmark harness on the CPU: the server process (start, ready, stop with its group), the
closed-loop client, /proc accounting, the ceilings, SLO-regime goodput, the fleet summary and the
vLLM peer's command and environment."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _server import group_is_gone

from tidal.bench import procs, vllm_peer
from tidal.bench.client import closed_loop
from tidal.bench.fleet_poller import engine_summary
from tidal.bench.metrics import SLO_REGIMES, RequestRecord, point_metrics, windows
from tidal.bench.server import CHECKOUT, ServerProcess, ServerStartError, checkout_env
from tidal.runtime.ports import free_port

# A stand-in server: /health, /v1/models, and a streamed completion of `max_tokens` chunks; it starts a
# child process (a worker) so that stopping it must take the whole process group.
STUB = r'''
import json, subprocess, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    def log_message(self, *args): pass
    def do_GET(self):
        body = {"/health": b"ok", "/v1/models": json.dumps({"data": [{"id": "stub-model"}]}).encode()}.get(self.path)
        self.send_response(200 if body else 404)
        self.end_headers()
        self.wfile.write(body or b"")
    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["content-length"])))
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.end_headers()
        for i in range(request["max_tokens"]):
            time.sleep(0.005)
            self.wfile.write(b'data: {"choices":[{"index":0,"text":"x"}]}\n\n')
            self.wfile.flush()
        usage = {"choices": [], "usage": {"prompt_tokens": len(request["prompt"]),
                                          "completion_tokens": request["max_tokens"]}}
        self.wfile.write(b"data: " + json.dumps(usage).encode() + b"\n\ndata: [DONE]\n\n")

worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print("worker", worker.pid, flush=True)
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
'''



@pytest.fixture
def stub_server(tmp_path):
    port = free_port()
    server = ServerProcess([sys.executable, "-c", STUB, str(port)], tmp_path / "stub.log", port, name="stub",
                           stop_signal=signal.SIGTERM)
    with server:
        yield server


def test_a_server_starts_streams_and_stops_with_its_workers(stub_server):
    assert stub_server.start_and_wait(timeout_s=30) > 0
    assert stub_server.wait_ready(timeout_s=5, need_model=True) == "stub-model"
    pgid = stub_server.pid
    # the stub's worker is in its group, found under it in /proc
    deadline = time.monotonic() + 5
    while not any("time.sleep(600)" in c for c in procs.descendants(pgid).values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert any("time.sleep(600)" in command for command in procs.descendants(pgid).values())
    assert procs.process_cpu_s(pgid) is not None and procs.group_cpu_s(pgid) >= procs.process_cpu_s(pgid)
    bodies = [{"model": "stub-model", "prompt": [1] * (i + 2), "max_tokens": 3 + i} for i in range(5)]
    records, wall_s = asyncio.run(closed_loop(stub_server.url, "/v1/completions", bodies, concurrency=2))
    assert wall_s > 0 and [r.status for r in records] == ["ok"] * 5
    assert [r.output_tokens for r in records] == [3, 4, 5, 6, 7]
    assert [r.input_tokens for r in records] == [2, 3, 4, 5, 6]
    assert all(r.ttft_s > 0 and len(r.itl_s) == r.output_tokens - 1 for r in records)
    stub_server.stop()
    assert group_is_gone(pgid), "the server's worker outlived it"
    stub_server.stop()  # twice is fine


def test_a_server_that_exits_or_hangs_fails_with_its_log(tmp_path):
    crashing = ServerProcess([sys.executable, "-c", "print('no model here'); raise SystemExit(3)"],
                             tmp_path / "crash.log", free_port(), name="crashing")
    with pytest.raises(ServerStartError, match="crashing exited with 3(.|\n)*no model here"):
        crashing.start_and_wait(timeout_s=30)
    hanging = ServerProcess([sys.executable, "-c", "import time; time.sleep(600)"], tmp_path / "hang.log",
                            free_port(), name="hanging")
    with pytest.raises(ServerStartError, match="not ready after 1 s"):
        hanging.start_and_wait(timeout_s=1)
    assert hanging.proc.poll() is not None  # stopped on the way out


def test_ports_and_the_child_environment():
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
    env = checkout_env({"PYTHONPATH": "/wheels", "X": "1"})
    assert env["PYTHONPATH"] == f"{CHECKOUT}{os.pathsep}/wheels" and env["X"] == "1"
    assert checkout_env({})["PYTHONPATH"] == str(CHECKOUT)
    assert (CHECKOUT / "tidal" / "bench" / "server.py").exists()


def test_proc_accounting(tmp_path):
    user, system = procs.cpu_times(os.getpid())
    assert user + system > 0 and procs.cpu_times(os.getpid(), os.getpid())[0] <= user + 1e-6
    assert procs.process_cpu_s(None) is None and procs.cpu_seconds([]) == 0.0
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        deadline = time.monotonic() + 5
        while not procs.cmdline(child.pid) and time.monotonic() < deadline:  # empty until the child execs
            time.sleep(0.01)
        assert procs.cmdline(child.pid).startswith(sys.executable)
        assert child.pid in procs.descendants(os.getpid())
        assert procs.sim_process_roles(child.pid) == {child.pid: "serving"}
    finally:
        child.kill()
        child.wait()
    assert procs.process_cpu_s(child.pid) is None and procs.cmdline(child.pid) is None
    roles = {1: "serving", 2: "serving", 3: "sim-worker"}
    rows, totals = procs.cpu_by_role(roles, {1: 0.0, 2: 1.0, 3: 0.0}, {1: 2.0, 2: 2.0, 3: 0.5}, span_s=2.0,
                                     tok_s=1000.0, expected=("client",))
    assert [r["cores"] for r in rows] == [1.0, 0.5, 0.25]
    assert totals["serving_cores"] == 1.5 and totals["serving_cores_max"] == 1.0
    assert totals["serving_cpu_us_per_token"] == pytest.approx(1500.0) and totals["sim-worker_cores"] == 0.25
    assert totals["client_cores"] == 0.0 and totals["client_cores_max"] == 0.0
    meter = procs.HostCpuMeter(None)
    sum(i * i for i in range(200_000))
    window = meter.stop()
    assert window["cpu_client_cores"] > 0 and window["cpu_server_cores"] == 0.0 and window["cpu_foreign_cores"] >= 0
    assert procs.wait_host_idle(0, 0.3) < 0.1
    assert procs.machine_info()["nproc_cmd"] >= 1


def test_ceilings_on_the_cpu():
    import torch

    from tidal.perf.ceilings import device_ceilings, gemm_gflops, wall_timer

    calls = []
    assert wall_timer(iters=4, warmup=2)(lambda: calls.append(1)) >= 0 and len(calls) == 6
    ceilings = device_ceilings("cpu", copy_bytes=1 << 20, matmul_n=128)
    assert set(ceilings) == {"copy_GBps_read_plus_write", "bf16_matmul_TFLOPs"}
    assert all(v > 0 for v in ceilings.values())
    fixed = device_ceilings("cpu", copy_bytes=1000, matmul_n=10, timer=lambda fn: (fn(), 1e-6)[1])
    assert fixed == {"copy_GBps_read_plus_write": pytest.approx(2.0), "bf16_matmul_TFLOPs": pytest.approx(2e-3)}
    assert gemm_gflops(torch.float32, m=16, k=32, n=32, iters=5) > 0
    if not torch.cuda.is_available():  # the child process reports its failure instead of raising
        from tidal.perf.ceilings import cards_and_ceilings

        assert "error" in cards_and_ceilings(env=checkout_env())


def _rec(i: int, scheduled_s: float, ttft_s: float | None, gaps: list[float], status: str = "ok",
         ended: bool = True) -> RequestRecord:
    e2e = None if not ended or ttft_s is None else ttft_s + sum(gaps)
    return RequestRecord(request_id=str(i), sent_s=scheduled_s, scheduled_s=scheduled_s, input_tokens=10,
                         status=status, ttft_s=ttft_s, itl_s=gaps, e2e_s=e2e, output_tokens=len(gaps) + 1)


def test_slo_regime_goodput_counts_the_window_and_every_miss():
    gaps_ok = [0.02] * 9 + [0.2]  # P90 within 50 ms, worst gap not
    records = [
        _rec(0, 0.5, 0.1, [0.02] * 5),  # warm-up: not counted
        _rec(1, 1.0, 0.2, gaps_ok),  # tight and balanced by its P90 gap (38 ms), not relaxed (25 ms)
        _rec(2, 2.0, 0.2, [0.02] * 4),  # good under every regime
        _rec(3, 3.0, 2.0, [0.02] * 4),  # relaxed only (TTFT 2 s)
        _rec(4, 4.0, 0.1, [0.02], ended=False),  # cut by the harness
        _rec(5, 5.0, None, [], status="rejected"),
        _rec(6, 20.0, 0.1, [0.02]),  # after the window
    ]
    m = point_metrics(records, warmup_s=1.0, measure_s=10.0, gpus=2, window_s=5.0)
    assert (m["requests"], m["finished"], m["unfinished"], m["rejected"], m["errors"]) == (5, 3, 1, 1, 0)
    balanced, relaxed, tight = (m["regimes"][k] for k in ("balanced", "relaxed", "tight"))
    assert set(m["regimes"]) == set(SLO_REGIMES)
    assert balanced["attainment_pct"] == pytest.approx(40.0) and balanced["goodput_rps"] == pytest.approx(0.2)
    assert balanced["goodput_per_gpu"] == pytest.approx(0.1)
    assert balanced["strict_attainment_pct"] == pytest.approx(20.0)  # request 1's worst gap misses 50 ms
    assert relaxed["attainment_pct"] == pytest.approx(40.0)
    assert tight["attainment_pct"] == pytest.approx(40.0)
    assert not any(r["p90_met"] for r in m["regimes"].values())  # a cut and a rejected request
    assert m["worst_stall_ms"]["max"] == pytest.approx(200.0)
    spans = windows(records, 5.0)
    assert [w["t"] for w in spans] == [0.0, 5.0, 10.0, 15.0, 20.0]
    assert [w["arrivals_per_s"] * 5 for w in spans] == [5, 1, 0, 0, 1]


def test_engine_summary_of_the_fleet_samples():
    def sample(t, steps, step_s, tokens, cpu_s, api_cpu_s):
        stats = {"steps_total": steps, "step_seconds_total": step_s, "prefill_tokens_total": 10 * steps,
                 "decode_seqs_total": 4 * steps, "generation_tokens": tokens, "kv_transfers": 0,
                 "kv_transfer_seconds": 0.0, "kv_transfer_bytes": 0, "num_running": 4, "num_waiting": 0,
                 "num_waiting_for_kv": 0}
        return {"t": t, "workers": {"both": 1}, "targets": {}, "frontend_cpu_s": cpu_s,
                "api_cpu_s": {"api0": api_cpu_s}, "engines": {"w0": {"role": "both", "cpu_s": cpu_s, **stats}}}

    samples = [sample(0.0, 0, 0.0, 0, 1.0, 0.0), sample(1.0, 50, 0.4, 200, 1.5, 0.1),
               sample(2.0, 100, 0.8, 400, 2.0, 0.2), sample(9.0, 500, 4.0, 2000, 9.0, 5.0)]
    summary = engine_summary(samples, 0.5, 2.5)
    w = summary["workers"]["w0"]
    assert summary["span_s"] == 1.0 and w["busy"] == 0.4 and w["step_ms"] == 8.0 and w["decode_batch"] == 4.0
    assert w["output_tok_s"] == 200 and w["prefill_tok_s"] == 500 and w["pull_ms"] is None and w["cpu"] == 0.5
    assert summary["frontend_cpu_by_process"] == {"serve": 0.5, "api0": 0.1} and summary["frontend_cpu"] == 0.6
    assert engine_summary(samples, 0.5, 1.5) == {}  # one sample is no window


def test_vllm_peer_environment_command_and_model_folder(tmp_path):
    env = vllm_peer.vllm_env("VLLM_CPU_KVCACHE_SPACE=8 EXTRA=x", environ={"VLLM_CPU_NUM_OF_RESERVED_CPU": "1"})
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "8" and env["EXTRA"] == "x"  # the flag wins over everything
    assert env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "1"  # the caller's environment over the defaults
    assert env["VLLM_TARGET_DEVICE"] == "cpu" and env["HF_HUB_OFFLINE"] == "1"
    command = vllm_peer.vllm_command("/venv/bin/python", Path("/t/launch.py"), Path("/m"), "bfloat16", 8123)
    assert command == ["/venv/bin/python", "/t/launch.py", "serve", "/m", "--dtype", "bfloat16", "--host",
                       "127.0.0.1", "--port", "8123", "--max-num-batched-tokens", "512"]
    compile(vllm_peer.LAUNCHER, "launcher", "exec")
    compile(vllm_peer.CONVERT_SCRIPT, "convert", "exec")
    for name in vllm_peer.HF_REQUIRED:
        (tmp_path / name).write_text("{}")
    assert vllm_peer.ensure_hf_dir(Path("/none.gguf"), tmp_path, pythons=[]) == tmp_path  # complete: no conversion
    with pytest.raises(RuntimeError, match="no python"):
        vllm_peer.ensure_hf_dir(Path("/none.gguf"), tmp_path / "missing", pythons=[])
    assert vllm_peer.python_has(sys.executable, "json") and not vllm_peer.python_has(sys.executable, "no_such_mod")


def test_servers_side_by_side_on_the_stub(stub_server):
    """`tidal.bench.serving_compare` (cpu_serving's loop): warm-up, every level measured into rows,
    a busy level measured again, the table."""
    from tidal.bench import serving_compare as sc

    prompts = sc.make_prompts(12, 5, low=10, high=60, special={11, 12}, seed=0)
    assert len({p[0] for p in prompts}) == 12 and all(len(p) == 5 and not {11, 12} & set(p) for p in prompts)
    meta, saved = {"rows": []}, []
    plan = sc.LevelPlan(input_len=5, output_len=4, startup_timeout_s=30, idle_wait_s=0, max_foreign_cores=-1)
    levels = [[prompts[2:4], prompts[4:8]], [prompts[8:10], prompts[8:12]]]  # [attempt][level]
    sc.run_server(plan, stub_server, {"server": "stub", "dtype": "float32"}, prompts[:2], levels, [1, 2], meta,
                  lambda: saved.append(len(meta["rows"])))
    rows = meta["rows"]
    assert [(r["concurrency"], r["completed"], r["attempt"]) for r in rows] == [(1, 2, 1), (2, 4, 1)]
    assert len(meta["discarded_busy_levels"]) == 2 and saved == [1, 2]  # max_foreign < 0: every level is busy
    assert rows[0]["model_id"] == "stub-model" and rows[0]["short_outputs"] == 0 and rows[0]["output_tok_s"] > 0
    assert rows[0]["prompt_tokens_seen"] == [5] and rows[1]["tokens_per_chunk"] == 1.0
    table = sc.markdown(rows + [{"server": "down", "dtype": "bf16", "error": "exited"}])
    assert table.count("\n") == 4 and "| stub | float32 | 2 | 4/4 |" in table and "ERROR: exited" in table


def test_streamed_window_counts_only_what_arrived_in_it():
    from tidal.bench.metrics import streamed_window

    # chunks at 1.0, 1.5, 2.5 s (request 0), 3.2 s (request 1); request 2 never streamed
    records = [_rec(0, 0.5, 0.5, [0.5, 1.0]), _rec(1, 3.0, 0.2, []), _rec(2, 1.0, None, [], status="error")]
    stats = streamed_window(records, 1.2, 3.0)
    assert stats["streamed_tok_s"] == 2 / 1.8 and stats["errors"] == 1
    assert stats["itl_ms"]["p50"] is not None and stats["ttft_ms"]["p50"] is None
    assert streamed_window(records, 0.0, 4.0)["ttft_ms"]["p99"] is not None
