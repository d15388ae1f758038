"""`tidal bench`: arrival processes, metric and goodput arithmetic, and a short run against a server."""

from __future__ import annotations

import json
import math
import random
import statistics

import pytest

from tidal.bench.arrivals import make_arrivals, square_rate
from tidal.bench.metrics import RequestRecord, parse_slo, percentile, summarize


def _gaps(kind: str, rate: float, n: int = 20000, **kw) -> list[float]:
    times = make_arrivals(kind, rate, random.Random(7), **kw)
    xs = [next(times) for _ in range(n)]
    return [b - a for a, b in zip(xs, xs[1:])]


@pytest.mark.parametrize("kind, kw, cv", [("constant", {}, 0.0), ("poisson", {}, 1.0),
                                          ("gamma", {"burstiness": 0.25}, 2.0), ("gamma", {"burstiness": 4.0}, 0.5)])
def test_arrival_mean_and_coefficient_of_variation(kind, kw, cv):
    gaps = _gaps(kind, 5.0, **kw)
    mean = statistics.fmean(gaps)
    assert mean == pytest.approx(0.2, rel=0.05)
    assert statistics.pstdev(gaps) / mean == pytest.approx(cv, abs=0.08)


def test_time_varying_rates_average_out():
    # square: 10 s at 4 x 2/s, then 30 s at 2/s -> (80 + 60) / 40 = 3.5/s on average
    times = make_arrivals("square", 2.0, random.Random(1), burst_factor=4.0, burst_s=10.0, calm_s=30.0)
    xs = []
    while not xs or xs[-1] < 4000:
        xs.append(next(times))
    assert len(xs) / xs[-1] == pytest.approx(3.5, rel=0.05)
    in_burst = sum(1 for t in xs if t % 40 < 10)
    assert in_burst / len(xs) == pytest.approx(80 / 140, abs=0.03)
    assert square_rate(2.0, 4.0, 10.0, 30.0)(5.0) == 8.0
    # sine: mean 3/s; ramp 1/s -> 5/s over 100 s: 300 arrivals expected in the first 100 s
    sine = make_arrivals("sine", 3.0, random.Random(2), amplitude=0.9, period_s=20.0)
    xs = [next(sine) for _ in range(6000)]
    assert len(xs) / xs[-1] == pytest.approx(3.0, rel=0.05)
    ramp = make_arrivals("ramp", 1.0, random.Random(3), end_rate=5.0, duration_s=100.0)
    first_100 = 0
    while next(ramp) < 100:
        first_100 += 1
    assert first_100 == pytest.approx(300, rel=0.15)


def test_bad_arrival_settings_are_refused():
    for kind, kw in (("poisson", {"rate": 0}), ("gamma", {"rate": 1, "burstiness": 0}),
                     ("sine", {"rate": 1, "amplitude": 2}), ("nope", {"rate": 1})):
        with pytest.raises(ValueError):
            make_arrivals(kind, kw.pop("rate"), random.Random(0), **kw)


def _record(i, ttft, gaps, status="ok", output_tokens=None):
    return RequestRecord(request_id=str(i), sent_s=float(i), scheduled_s=float(i), input_tokens=10, status=status,
                         ttft_s=ttft, itl_s=gaps, e2e_s=None if ttft is None else ttft + sum(gaps),
                         output_tokens=len(gaps) + 1 if output_tokens is None else output_tokens)


def test_metric_and_goodput_arithmetic():
    records = [
        _record(0, 0.1, [0.02] * 9),  # e2e 0.28, tpot 0.18 / 9 = 0.02, max gap 20 ms: good
        _record(1, 0.3, [0.02] * 8 + [0.2]),  # ttft 300 ms > 250: miss; max gap 200 ms
        _record(2, 0.2, [0.01] * 19 + [0.06]),  # max gap 60 ms > 50: miss; worst 10%: (0.06 + 0.01) / 2
        _record(3, None, [], status="error", output_tokens=0),
        _record(4, None, [], status="rejected", output_tokens=0),
    ]
    assert records[0].tpot_s == pytest.approx(0.02)
    assert records[2].worst_decile_itl_s == pytest.approx(0.035)
    slo = parse_slo("ttft_ms=250,itl_ms=50")
    assert [r.good(slo) for r in records] == [True, False, False, False, False]
    s = summarize(records, duration_s=2.0, slo=slo, offered_rate=3.0)
    assert (s["requests"], s["ok"], s["errors"], s["rejected"]) == (5, 3, 1, 1)
    assert s["goodput_rps"] == pytest.approx(0.5) and s["slo_attainment_pct"] == pytest.approx(20.0)
    assert s["ttft_ms"]["p50"] == pytest.approx(200.0)
    assert s["output_tokens_per_s"] == pytest.approx((10 + 10 + 21) / 2)
    assert s["max_itl_ms"]["p50"] == pytest.approx(60.0)
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([], 50) is None
    assert math.isclose(percentile([0, 10], 99), 9.9)


def test_bad_slo_is_refused():
    with pytest.raises(ValueError, match="ttft_ms"):
        parse_slo("ttft=5")


def _mooncake_sample(path):
    rows = [{"timestamp": 1000, "input_length": 1100, "output_length": 20, "hash_ids": [0, 1, 2]},
            {"timestamp": 1500, "input_length": 700, "output_length": 30, "hash_ids": [0, 3]},
            {"timestamp": 4000, "input_length": 1030, "output_length": 9, "hash_ids": [0, 1, 4]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _azure_sample(path):
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                    "2023-11-16 18:15:46.6805900,374,44\n"
                    "2023-11-16 18:15:47.1805900,96,109\n"
                    "2023-11-16 18:15:50.6805900,2000,5\n")
    return path


def test_trace_parsing_scaling_and_prefixes(tmp_path):
    from tidal.bench.traces import load_trace, synthesize_prompt

    moon = load_trace(_mooncake_sample(tmp_path / "m.jsonl"), time_scale=2.0, max_input_len=1024)
    assert [r.time_s for r in moon] == [0.0, 1.0, 6.0]
    assert [r.input_len for r in moon] == [1024, 700, 1024] and moon[1].output_len == 30
    rng = random.Random(0)
    a, b, c = (synthesize_prompt(r, 1000, rng) for r in moon)
    assert len(a) == 1024 and len(b) == 700
    assert a[:512] == b[:512] == c[:512]  # hash id 0 everywhere
    assert a[512:1024] == c[512:1024]  # hash id 1 in both
    assert a[512:600] != b[512:600]
    azure = load_trace(_azure_sample(tmp_path / "a.csv"), max_output_len=100, max_requests=2)
    assert [round(r.time_s, 3) for r in azure] == [0.0, 0.5]
    assert [(r.input_len, r.output_len) for r in azure] == [(374, 44), (96, 100)]
    with pytest.raises(ValueError, match="trace format"):
        load_trace(tmp_path / "x.txt")


@pytest.mark.slow
def test_bench_run_against_a_server_writes_records_and_summary(tmp_path):
    from _server import running_server
    from tidal.bench.runner import Bench, BenchConfig

    with running_server([], tmp_path / "serve.log") as url:  # the embedded model
        import asyncio

        synthetic = BenchConfig(url=url, workload="synthetic", arrival="gamma", burstiness=0.5, rate=20.0, requests=12,
                                input_len=40, input_len_range=0.5, output_len=6, vocab_size=49152,
                                output=str(tmp_path / "synthetic"), slo=(("ttft_ms", 60000.0),),
                                max_concurrency=2)
        chat = BenchConfig(url=url, workload="chat", arrival="constant", rate=10.0, sessions=3, turns=3,
                           think_s=0.05, system_words=20, user_words=5, output_len=5, output=str(tmp_path / "chat"))
        trace = BenchConfig(url=url, workload="trace", trace=str(_mooncake_sample(tmp_path / "m.jsonl")),
                            time_scale=0.2, max_input_len=300, max_output_len=4, vocab_size=49152,
                            output=str(tmp_path / "trace"))
        summaries = [asyncio.run(Bench(config).run()) for config in (synthetic, chat, trace)]
        from tidal.bench.rate_sweep import sweep

        runs, capacity = sweep(BenchConfig(url=url, workload="synthetic", arrival="sine", period_s=1.0, requests=3,
                                           input_len=20, output_len=3, vocab_size=49152,
                                           output=str(tmp_path / "sweep"), slo=(("ttft_ms", 60000.0),)),
                               [2.0, 4.0])
        assert [r["requests"] for r in runs] == [3, 3] and capacity == 4.0
        assert (tmp_path / "sweep" / "rate-4" / "summary.json").exists()
    assert summaries[0]["requests"] == 12 and summaries[0]["ok"] == 12
    spans = [(r["sent_s"], r["sent_s"] + r["e2e_s"]) for r in
             map(json.loads, (tmp_path / "synthetic" / "records.jsonl").read_text().splitlines())]
    assert max(sum(a <= t < b for a, b in spans) for t, _ in spans) <= 2  # max_concurrency held
    assert summaries[0]["slo_attainment_pct"] == 100.0
    assert summaries[1]["requests"] == 9 and summaries[1]["ok"] == 9
    assert summaries[2]["requests"] == 3 and summaries[2]["ok"] == 3
    for name, n in (("synthetic", 12), ("chat", 9), ("trace", 3)):
        lines = (tmp_path / name / "records.jsonl").read_text().splitlines()
        assert len(lines) == n
        record = json.loads(lines[0])
        assert record["status"] == "ok" and record["ttft_s"] > 0 and record["output_tokens"] > 0
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["requests"] == n and summary["ttft_ms"]["p50"] > 0
        for plot in ("timeline.png", "cdf.png"):
            assert (tmp_path / name / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from tidal.bench.plots import compare

    table = compare([tmp_path / "synthetic", tmp_path / "trace"], tmp_path / "cmp")
    assert "| synthetic | 12 | 12 |" in table and "| trace | 3 | 3 |" in table
    assert (tmp_path / "cmp" / "compare.png").exists()
    chat_records = [json.loads(x) for x in (tmp_path / "chat" / "records.jsonl").read_text().splitlines()]
    # each turn resends the history with the real reply: the prompt grows turn by turn
    by_session = {}
    for r in chat_records:
        by_session.setdefault(r["session"], []).append((r["turn"], r["input_tokens"]))
    for turns in by_session.values():
        sizes = [tokens for _, tokens in sorted(turns)]
        assert sizes == sorted(sizes) and sizes[0] < sizes[-1]


def test_a_run_split_over_client_processes_adds_up():
    from tidal.bench.clients import share
    from tidal.bench.runner import BenchConfig

    config = BenchConfig(url="http://x", workload="chat", rate=9.0, sessions=10, requests=7, max_concurrency=5)
    shares = [share(config, i, 3) for i in range(3)]
    assert [s.sessions for s in shares] == [4, 3, 3] and [s.requests for s in shares] == [3, 2, 2]
    assert [s.max_concurrency for s in shares] == [2, 2, 1]
    assert all(s.rate == 3.0 and s.num_clients == 3 and not s.progress and s.output is None for s in shares)
    assert [s.client_index for s in shares] == [0, 1, 2]


def test_client_cpu_is_reported_and_a_busy_client_warned_about(caplog):
    from tidal.bench.metrics import format_summary
    from tidal.bench.runner import client_cpu

    idle = client_cpu(2.0, duration_s=10.0)
    assert idle["client_cpu_cores"] == pytest.approx(0.2) and idle["client_warning"] is None
    busy = client_cpu([9.5, 3.0], duration_s=10.0)
    assert busy["client_processes"] == 2 and busy["client_cpu_cores"] == pytest.approx(1.25)
    assert busy["client_cpu_cores_max"] == pytest.approx(0.95) and "client-bound" in busy["client_warning"]
    assert "client-bound" in caplog.text
    summary = summarize([_record(0, 0.1, [0.02])], 1.0, {}) | busy
    assert "2 process(es), 1.25 cores" in format_summary(summary)


@pytest.mark.slow
def test_bench_from_two_client_processes_merges_their_records(tmp_path):
    from _server import running_server
    from tidal.bench.rate_sweep import run_bench
    from tidal.bench.runner import BenchConfig

    with running_server(["--workers", "2", "--timing", "base_s=0.002"], tmp_path / "sim.log", command="sim") as url:
        config = BenchConfig(url=url, workload="synthetic", arrival="constant", rate=40.0, requests=11, input_len=20,
                             output_len=4, vocab_size=49152, output=str(tmp_path / "run"))
        summary = run_bench(config, processes=2)
    assert summary["requests"] == 11 and summary["ok"] == 11
    assert summary["client_processes"] == 2 and 0 < summary["client_cpu_cores"] < 2
    records = [json.loads(x) for x in (tmp_path / "run" / "records.jsonl").read_text().splitlines()]
    assert sorted(r["request_id"] for r in records) == sorted(f"synthetic-{i}" for i in range(11))
    assert max(r["sent_s"] for r in records) < 5.0  # one clock for both shares


@pytest.mark.slow
def test_a_closed_loop_starts_nothing_after_its_duration(tmp_path):
    from _server import running_server
    from tidal.bench.rate_sweep import run_bench
    from tidal.bench.runner import BenchConfig

    with running_server(["--workers", "1", "--timing", "base_s=0.01"], tmp_path / "sim.log", command="sim") as url:
        config = BenchConfig(url=url, workload="synthetic", arrival="constant", rate=1e5, requests=10_000,
                             max_concurrency=4, duration_s=1.5, input_len=20, output_len=8, vocab_size=49152,
                             output=str(tmp_path / "run"))
        summary = run_bench(config)
    records = [json.loads(x) for x in (tmp_path / "run" / "records.jsonl").read_text().splitlines()]
    assert 4 <= summary["requests"] < 10_000 and summary["ok"] == summary["requests"]
    assert max(r["sent_s"] for r in records) < 1.5
