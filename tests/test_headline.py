"""The headline harness (benchmarks/headline.py) on the CPU: one smoke point for AGG and one for TIDAL
(planner on), each through `tidal serve -f` and the bench, then the report on their lines."""

from __future__ import annotations

import json

import pytest

from benchmarks import headline
from tidal.bench import headline as parts
from tidal.bench.headline_report import plot_square, write_report
from tidal.bench.metrics import SLO_REGIMES


def test_deployments_carry_the_gpu_settings():
    hw = parts.Hardware(smoke=False, gpus=4, tokenizer="/tmp/tok", kv_cache_memory_gib=40, max_model_len=16384)
    tidal = parts.deployment(parts.Arm("tidal", 4, split=(2, 2)), hw, port=9000)
    assert tidal["kv_transfer"] == {"backend": "cuda_ipc"}
    assert tidal["engine"]["dtype"] == "bfloat16"
    assert [w["devices"] for w in tidal["workers"]] == [["cuda:0", "cuda:1"], ["cuda:2", "cuda:3"]]
    assert tidal["planner"]["max_workers"] == 4 and tidal["planner"]["allow_flips"]
    assert tidal["planner"]["devices"] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert tidal["disaggregation"]["local_prefill_threshold"] == 512
    disagg = parts.deployment(parts.Arm("disagg", 4, split=(3, 1)), hw, port=9000)
    assert disagg["disaggregation"]["local_prefill_threshold"] == 0 and "planner" not in disagg
    agg = parts.deployment(parts.Arm("agg", 4, token_budget=2048), hw, port=9000)
    assert agg["workers"] == [{"role": "both", "count": 4, "devices": ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]}]
    assert agg["engine"]["token_budget"] == 2048
    from tidal.deploy.config import parse_deployment

    for config in (tidal, disagg, agg):
        parse_deployment(config)


@pytest.mark.slow
def test_smoke_points_and_report(tmp_path):
    out = tmp_path / "results.jsonl"
    common = ["--smoke", "--out", str(out), "--run-dir", str(tmp_path / "runs")]
    assert headline.main([*common, "--arm", "agg"]) == 0
    assert headline.main([*common, "--arm", "tidal"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["arm"] for r in rows] == ["agg-g2-tb4096", "tidal-g2-1p1d"]
    for row in rows:
        assert row["point"] == "chat-poisson-x1" and row["requests"] > 0
        assert row["finished"] + row["unfinished"] + row["errors"] + row["rejected"] == row["requests"]
        assert set(row["regimes"]) == set(SLO_REGIMES)
        for regime in row["regimes"].values():
            assert {"attainment_pct", "goodput_rps", "goodput_per_gpu", "strict_attainment_pct", "p90_met"} <= set(regime)
        assert row["worst_stall_ms"]["max"] is not None and row["windows"] and row["pools"]
        # where the time went: both workers counted, the processes' CPU read, tokens produced
        engines = row["engines"]
        workers = engines["workers"].values()
        assert engines["frontend_cpu"] > 0 and len(workers) == 2, engines
        assert all(0 <= w["busy"] <= 1.05 and w["cpu"] is not None for w in workers), engines
        assert any(w["step_ms"] for w in workers) and sum(w["output_tok_s"] for w in workers) > 0, engines
    tidal = rows[1]
    assert tidal["planner"] and sum(tidal["pools"][-1]["workers"].values()) == 2  # flips move workers, never add
    assert any(sample["targets"] for sample in tidal["pools"])  # the planner's gauge was read
    # resumable: the same invocation again runs nothing
    assert headline.main([*common, "--arm", "agg"]) == 0
    assert len(out.read_text().splitlines()) == 2
    text = write_report([str(out)], str(tmp_path / "report"))
    assert "agg-g2-tb4096" in text and "tidal-g2-1p1d" in text
    assert (tmp_path / "report" / "attainment_chat.png").exists()
    assert (tmp_path / "report" / "goodput_chat.png").exists()
    square = {**tidal, "bench": {**tidal["bench"], "arrival": "square"}}
    assert plot_square(square, tmp_path / "square.png").exists()


def test_points_by_id_extend_the_grid():
    points = parts.select_points("chat", "chat-poisson-x0.875,chat-poisson-x1,chat-gamma0.5-x1.25")
    assert [(p.point_id, p.load, p.arrival, p.burstiness) for p in points] == [
        ("chat-poisson-x1", 1.0, "poisson", 1.0), ("chat-poisson-x0.875", 0.875, "poisson", 1.0),
        ("chat-gamma0.5-x1.25", 1.25, "gamma", 0.5)]
    with pytest.raises(SystemExit):
        parts.select_points("chat", "long-poisson-x2")


def test_sim_arms_on_the_profile():
    """The simulator preview (`--sim`): chat turns carry their history as cached tokens, every arm
    runs, attainment is a share."""
    from tidal.perf.profile import load_profile
    from tidal.sim import headline as sim

    chat = parts.GPU_FAMILIES["chat"].bench
    requests = sim.chat_requests(2.0, chat, 20.0, seed=0)
    assert [r.request_id for r in requests] == list(range(len(requests)))
    assert all(a.arrival_s <= b.arrival_s for a, b in zip(requests, requests[1:]))
    first_turn = round(chat["system_words"] * sim.TOKENS_PER_WORD)
    assert min(r.cached_tokens for r in requests) == first_turn
    assert all(r.input_len > r.cached_tokens for r in requests)
    profile = load_profile(str(headline.REPO / "benchmarks/results/profile-llama-3.1-8b-NVIDIA-H200.json"))
    for kind in ("agg", "disagg", "tidal"):
        row = sim.run_arm(kind, 2, (1, 1), [sim._copy(r) for r in requests], profile)
        assert "error" not in row and row["unfinished"] == 0
        assert all(0 <= row[name] <= 100 for name in SLO_REGIMES)


def test_report_capacity_is_the_highest_rate_at_ninety_percent():
    from tidal.bench.headline_report import capacity, tables

    def row(rate, attainment):
        regimes = {g: {"attainment_pct": attainment, "goodput_per_gpu": rate / 2} for g in SLO_REGIMES}
        return {"arm": "agg-g2-tb4096", "point": f"chat-poisson-x{rate:g}", "family": "chat", "gpus": 2, "load": rate,
                "rate": rate, "bench": {"arrival": "poisson"}, "regimes": regimes, "requests": 10, "unfinished": 0,
                "errors": 0, "rejected": 0, "ttft_ms": {"p90": 100.0}, "itl_ms": {"p99": 20.0},
                "worst_stall_ms": {"p99": 50.0}}

    rows = [row(1.0, 99.0), row(2.0, 91.0), row(3.0, 60.0)]
    assert capacity(rows) == 2.0 and capacity([rows[2]]) is None
    text = tables(rows)
    assert "| chat | agg-g2-tb4096 | 2 | 2.00 | 1.00 | 1.00, 2.00, 3.00 |" in text
