"""The headline harness (benchmarks/headline.py) on the CPU: one smoke point for AGG and one for TIDAL
(planner on), each through `tidal serve -f` and the bench, then the report on their lines."""

from __future__ import annotations

import json

import pytest

from benchmarks import headline
from benchmarks.headline_report import write_report
from tidal.bench.metrics import SLO_REGIMES


def test_deployments_carry_the_gpu_settings():
    hw = headline.Hardware(smoke=False, gpus=4, tokenizer="/tmp/tok", kv_cache_memory_gib=40, max_model_len=16384)
    tidal = headline.deployment(headline.Arm("tidal", 4, split=(2, 2)), hw, port=9000)
    assert tidal["kv_transfer"] == {"backend": "cuda_ipc"}
    assert tidal["engine"]["dtype"] == "bfloat16"
    assert [w["devices"] for w in tidal["workers"]] == [["cuda:0", "cuda:1"], ["cuda:2", "cuda:3"]]
    assert tidal["planner"]["max_workers"] == 4 and tidal["planner"]["allow_flips"]
    assert tidal["planner"]["devices"] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert tidal["disaggregation"]["local_prefill_threshold"] == 512
    disagg = headline.deployment(headline.Arm("disagg", 4, split=(3, 1)), hw, port=9000)
    assert disagg["disaggregation"]["local_prefill_threshold"] == 0 and "planner" not in disagg
    agg = headline.deployment(headline.Arm("agg", 4, token_budget=2048), hw, port=9000)
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
    from benchmarks.headline_report import plot_square

    assert plot_square(square, tmp_path / "square.png").exists()


def test_points_by_id_extend_the_grid():
    points = headline.select_points("chat", "chat-poisson-x0.875,chat-poisson-x1,chat-gamma0.5-x1.25")
    assert [(p.point_id, p.load, p.arrival, p.burstiness) for p in points] == [
        ("chat-poisson-x1", 1.0, "poisson", 1.0), ("chat-poisson-x0.875", 0.875, "poisson", 1.0),
        ("chat-gamma0.5-x1.25", 1.25, "gamma", 0.5)]
    with pytest.raises(SystemExit):
        headline.select_points("chat", "long-poisson-x2")
