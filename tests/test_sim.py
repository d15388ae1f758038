"""`tidal sim`: the real frontend and router over simulated workers, driven by `tidal bench`.

With a timing model of 20 ms a step plus 50 us a prefill token, a 512-token prompt alone costs one
45.6 ms prefill step, so at low load TTFT sits just above that; at a load the eight workers can't
absorb (a 512-token budget fits one prompt a step: at most ~22 prompts/s a worker), requests queue
and TTFT grows.
"""

from __future__ import annotations

import asyncio
import os

import httpx
import pytest

from _server import running_server
from tidal.bench.runner import Bench, BenchConfig
from tidal.protocol import AddRequest, SamplingParams
from tidal.router.config import RouterConfig
from tidal.router.service import Router
from tidal.sim.serve import parse_timing
from tidal.sim.timing import TimingModel
from tidal.sim.workers import SimCluster

pytestmark = pytest.mark.slow


def test_timing_model_and_its_parser():
    model = parse_timing("base_s=0.02,prefill_s_per_token=0.00005")
    assert model.step_s(512, 0, 0) == pytest.approx(0.0456)
    assert model.step_s(0, 10, 10_000) == pytest.approx(0.02 + 10 * TimingModel().decode_s_per_seq
                                                        + 10_000 * TimingModel().decode_s_per_kv_token)
    with pytest.raises(ValueError, match="base_s"):
        parse_timing("bogus=1")


def test_sim_with_8_workers_ttft_grows_with_load(tmp_path):
    args = ["--workers", "8", "--timing", "base_s=0.02,prefill_s_per_token=0.00005", "--router", "round_robin",
            "--token-budget", "512"]
    with running_server(args, tmp_path / "sim.log", command="sim") as url:
        def run(rate: float, n: int) -> dict:
            config = BenchConfig(url=url, workload="synthetic", arrival="constant", rate=rate, requests=n,
                                 input_len=512, output_len=4, vocab_size=49152)
            return asyncio.run(Bench(config).run())

        low = run(2.0, 8)
        high = run(240.0, 160)  # 30/s a worker, more than one 45.6 ms step each can serve
        workers = httpx.get(url + "/admin/workers").json()["workers"]
    assert low["ok"] == 8 and high["ok"] == 160
    assert len(workers) == 8 and all(w["stats"]["prompt_tokens"] > 0 for w in workers)
    # low load: one 45.6 ms prefill step, plus the frontend's share
    assert 45.6 <= low["ttft_ms"]["p50"] < 150
    assert high["ttft_ms"]["p50"] > 1.5 * low["ttft_ms"]["p50"], (low["ttft_ms"], high["ttft_ms"])


def _children(pid: int) -> set[int]:
    """Live child processes of `pid`, from /proc (a reaped or zombie child doesn't count)."""
    out = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out.update(int(c) for c in f.read().split())
    return {c for c in out if os.path.exists(f"/proc/{c}") and not _is_zombie(c)}


def _is_zombie(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "Z"


def test_sim_workers_in_their_own_processes_serve_the_router_and_stop_cleanly():
    """Three workers dealt over two spawned processes: every request completes through the real
    router, the workers' pids are those processes, and stop_all leaves no child and no socket file."""
    async def scenario() -> tuple[list[list[int]], set[int], SimCluster]:
        cluster = SimCluster(3, TimingModel(base_s=0.002), worker_processes=2)
        router = Router(cluster.discovery, RouterConfig(policy="round_robin"))
        try:
            await cluster.start()
            await router.start()
            await router.wait_ready(timeout_s=120)
            pids = {info.pid for info in cluster.discovery.list()}

            async def one(i: int) -> list[int]:
                request = AddRequest(request_id=f"r{i}", prompt_token_ids=list(range(100 + i, 140 + i)),
                                     sampling_params=SamplingParams(max_tokens=5, temperature=0.0))
                return [t async for delta in router.generate(request) for t in delta.new_token_ids]
            outputs = await asyncio.gather(*(one(i) for i in range(6)))
        finally:
            await router.close()
            await cluster.stop_all()
        return outputs, pids, cluster

    outputs, pids, cluster = asyncio.run(scenario())
    assert [len(tokens) for tokens in outputs] == [5] * 6
    assert len(pids) == 2 and os.getpid() not in pids
    assert not _children(os.getpid()) & pids
    assert not os.path.exists(cluster.dir) and not cluster.discovery.list()
