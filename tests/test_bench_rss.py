"""The soak run's RSS accounting (`tidal.bench.rss`): reading a live process tree, labels that stay
with their process, and the growth table after a warm-up."""

from __future__ import annotations

import os
import subprocess
import sys

from tidal.bench.rss import MIB, RssSample, RssSampler, format_rows, growth_rows, rss_bytes


def test_rss_of_a_live_tree_with_stable_labels():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert rss_bytes(os.getpid()) > 10 * MIB
        sampler = RssSampler(os.getpid())
        first = sampler.sample(0.0)
        child_label = sampler.labels[child.pid]  # child-0, or later if this process has other children
        assert first.rss_bytes["frontend"] > 10 * MIB and first.rss_bytes[child_label] > 0
        assert 0 < first.anon_bytes["frontend"] <= first.rss_bytes["frontend"]
        # Told later that the child is a worker: its label becomes the worker's id, and stays.
        second = sampler.sample(1.0, {child.pid: "decode-0"})
        assert {"frontend", "decode-0"} <= set(second.rss_bytes) and child_label not in second.rss_bytes
        assert "decode-0" in sampler.sample(2.0).rss_bytes
    finally:
        child.kill()
        child.wait()
    assert rss_bytes(child.pid) is None


def test_growth_rows_measure_from_the_end_of_the_warm_up():
    samples = [RssSample(0.0, {"frontend": 100 * MIB}),
               RssSample(10.0, {"frontend": 300 * MIB, "decode-0": 200 * MIB}, {"frontend": 250 * MIB}),  # warm-up end
               RssSample(20.0, {"frontend": 350 * MIB, "decode-0": 200 * MIB, "child-0": 50 * MIB}),
               RssSample(30.0, {"frontend": 330 * MIB, "decode-0": 210 * MIB}, {"frontend": 255 * MIB})]
    rows = {r["process"]: r for r in growth_rows(samples, warmup_s=10.0)}
    assert rows["frontend"] == {"process": "frontend", "warmup_end_mib": 300.0, "end_mib": 330.0, "max_mib": 350.0,
                                "growth_mib": 30.0, "growth_pct": 10.0, "anon_growth_mib": 5.0, "present_at_end": True}
    assert (rows["decode-0"]["growth_mib"], rows["decode-0"]["growth_pct"]) == (10.0, 5.0)
    # Started after the warm-up and gone before the end: from its first sample to its last.
    assert (rows["child-0"]["growth_mib"], rows["child-0"]["present_at_end"]) == (0.0, False)
    text = format_rows(list(rows.values()))
    assert "frontend" in text and "+30.0" in text and "(gone)" in text
