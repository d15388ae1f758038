"""The planner service in a deployment.

- In-process, with a scripted planner: the observations it gets carry per-worker step statistics
  and request latencies; its flip runs through the local actuator under load; the decision shows in
  `tidal_planner_decisions_total`, the flip in `tidal_planner_flip_unavailable_seconds`, and in the log.
- End to end (`tidal serve -f` with a `planner:` section and the real `Planner` core): a burst of
  requests makes a decision appear in /metrics and in the log.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time

import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from _fleet import Fleet, deployment
from _server import REPO_ROOT, metrics, running_server
from tidal.fleet_snapshot import FinishedRequest, FleetSnapshot, WorkerSnapshot
from tidal.planner.core import Planner
from tidal.planner.service import ObservationCollector, PlannerService
from tidal.protocol import EngineStats
from tidal.planner.types import percentile as _percentile
from tidal.planner.types import Action, Decision, PlannerConfig, SLO


def test_percentile_is_nearest_rank():
    # 10 values: p50 -> rank ceil(5.0) = 5 -> 5; p90 -> rank ceil(9.0) = 9 -> 9; one value: itself.
    values = [float(v) for v in range(10, 0, -1)]
    assert (_percentile(values, 50), _percentile(values, 90), _percentile([7.0], 90), _percentile([], 50)) == \
        (5.0, 9.0, 7.0, None)


def _stats(steps: int, step_s: float, prefill: int, generated: int) -> EngineStats:
    return EngineStats(num_running=2, num_waiting=1, kv_blocks_used=25, kv_blocks_total=100, prefix_cache_hit_tokens=0,
                       prompt_tokens=prefill, generation_tokens=generated, steps_total=steps,
                       step_seconds_total=step_s, prefill_tokens_total=prefill)


def test_collector_reads_only_the_published_snapshot():
    """Two snapshots 2 s apart -> one observation: counters diffed, latencies from what finished since."""
    clock = [0.0]
    snapshots = [FleetSnapshot(0.0, (WorkerSnapshot("d0", "decode", block_size=16, stats=_stats(10, 0.1, 100, 50)),),
                               queue_depth=0, arrivals_total=5, finished=())]
    collector = ObservationCollector(lambda: snapshots[-1], clock=lambda: clock[0])
    collector.collect()  # a first look: the baseline of every worker's counters
    clock[0] = 2.0
    snapshots.append(FleetSnapshot(
        2.0, (WorkerSnapshot("d0", "decode", draining=True, pending_prefill_tokens=64, block_size=16,
                             stats=_stats(30, 0.5, 300, 90)),
              WorkerSnapshot("p0", "prefill", connected=False)),
        queue_depth=3, arrivals_total=9,
        finished=(FinishedRequest(-1.0, 9.9, None, 1, 0, 1), FinishedRequest(1.5, 0.2, 0.01, 100, 25, 11))))
    obs = collector.collect()
    assert (obs.interval_s, obs.frontend.request_rate, obs.frontend.queue_depth) == (2.0, 2.0, 3)
    assert (obs.frontend.ttft_ms_p90, obs.frontend.itl_ms_p90, obs.frontend.prefix_hit_rate) == (200.0, 10.0, 0.25)
    d0, p0 = obs.workers
    assert (d0.state, d0.steps, d0.step_s_mean, d0.prefill_tokens, d0.decode_tokens) == ("draining", 20, 0.02, 200, 40)
    assert (d0.pending_prefill_tokens, d0.kv_used_fraction, d0.kv_capacity_tokens) == (64, 0.25, 1600)
    assert (p0.worker_id, p0.role, p0.state) == ("p0", "prefill", "starting")


class _RecordingActuator:
    """Records the adds, removes and flips it is asked for; carries none out."""

    def __init__(self):
        self.calls = []

    async def add_worker(self, role):
        self.calls.append(("add", role))

    async def remove_worker(self, worker_id):
        self.calls.append(("remove", worker_id))

    async def flip_worker(self, worker_id, role):
        self.calls.append(("flip", worker_id, role))


async def test_no_finished_requests_and_no_reports_no_decision():
    """The planner example's fleet (1 prefill, 1 decode, min_prefill 0, budget 3) as the router publishes
    it before any load report and with no request arrived or finished: 25 s of 1-s steps (two
    predictive windows) decide nothing. Once both workers report an idle engine (zero arrivals counted:
    data), the next predictive window removes the idle prefill worker, as designed."""
    config = PlannerConfig(slo=SLO(ttft_ms=500, itl_ms=100), max_workers=3, min_prefill=0, min_decode=1,
                           reactive_interval_s=1.0, predictive_interval_s=10.0, predictor="holt",
                           scale_down_cooldown_s=10.0)
    idle = EngineStats(num_running=0, num_waiting=0, kv_blocks_used=0, kv_blocks_total=100, prefix_cache_hit_tokens=0,
                       prompt_tokens=0, generation_tokens=0)
    stats = [None]

    def snapshot():
        workers = tuple(WorkerSnapshot(worker_id, role, block_size=16, stats=stats[0])
                        for worker_id, role in (("prefill-0", "prefill"), ("decode-0", "decode")))
        return FleetSnapshot(clock[0], workers, queue_depth=0, arrivals_total=0, finished=())

    clock = [0.0]
    actuator = _RecordingActuator()
    planner, seen = Planner(config), []

    class Recording:
        def step(self, obs):
            seen.append(obs)
            return planner.step(obs)

    service = PlannerService(config, snapshot, actuator, CollectorRegistry(), Recording())
    service.collector = ObservationCollector(snapshot, clock=lambda: clock[0])
    for _ in range(25):
        clock[0] += 1.0
        decision = service.step_once()
        assert decision.actions == (), decision
        assert [w.reported for w in seen[-1].workers] == [False, False]
    assert "ttft p90 -/500 ms, itl p90 -/100 ms" in decision.explanation
    stats[0] = idle
    for _ in range(10):
        clock[0] += 1.0
        decision = service.step_once()
        if decision.actions:
            break
    assert decision.loop == "predictive"
    assert decision.actions == (Action("remove", "prefill", "prefill-0", "idle"),)
    await service._executor
    assert actuator.calls == [("remove", "prefill-0")]


class _Scripted:
    """Flips decode-1 to prefill at the first observation that saw finished requests."""

    def __init__(self):
        self.observations = []
        self.flipped = False

    def step(self, obs):
        self.observations.append(obs)
        flip = obs.frontend.ttft_ms_p90 is not None and len(self.observations) == 2
        actions = (Action("flip", "prefill", "decode-1", reason="ttft_over_slo"),) if flip else ()
        self.flipped = self.flipped or flip  # the service's own loop may call again on a slow box: targets stay
        return Decision(obs.time_s, 2 if self.flipped else 1, 1 if self.flipped else 2, actions, "reactive", "scripted")


@pytest.mark.slow
async def test_service_observes_decides_and_flips_under_load(caplog):
    caplog.set_level(logging.INFO, logger="tidal.planner")
    async with Fleet(deployment(prefill=1, decode=2)) as fleet:
        scripted = _Scripted()
        service = PlannerService(PlannerConfig(slo=SLO(ttft_ms=1, itl_ms=1)), fleet.router.snapshot, fleet.actuator,
                                 fleet.router.registry, scripted)
        await service.start()
        service.step_once()  # a first look: the baseline of every counter
        tasks = fleet.load(24)
        while sum(t.done() for t in tasks) < 8:
            await asyncio.sleep(0.02)
        stop = asyncio.Event()
        feeder = asyncio.create_task(fleet.feed(tasks, stop))
        service.step_once()  # sees finished requests -> the scripted flip
        while service._executor is not None and not service._executor.done():
            await asyncio.sleep(0.02)
        stop.set()
        await feeder
        assert await asyncio.gather(*tasks) == ["length"] * len(tasks)
        await service.close()
        obs = scripted.observations[1]
        assert obs.frontend.num_requests >= 24 and obs.frontend.ttft_ms_p90 > 0 and obs.frontend.isl_mean > 0
        by_id = {w.worker_id: w for w in obs.workers}
        assert by_id["prefill-0"].prefill_tokens > 0 and by_id["decode-0"].decode_tokens > 0
        assert by_id["decode-0"].steps > 0 and by_id["decode-0"].step_s_mean > 0
        assert by_id["decode-0"].decode_batch_mean >= 1 and by_id["decode-0"].context_tokens_mean > 0
        assert fleet.router.workers["decode-1"].client.role == "prefill"
        text = generate_latest(fleet.router.registry).decode()
        assert 'tidal_planner_decisions_total{action="flip",reason="ttft_over_slo"} 1.0' in text
        assert 'tidal_planner_target_workers{role="prefill"} 2.0' in text
        assert "tidal_planner_flip_unavailable_seconds_count 1.0" in text
        assert service.flips[0].unavailable_s < 1.0
        assert "flip decode-1 -> prefill (ttft_over_slo)" in caplog.text


def _burst(url: str, n: int) -> None:
    body = {"model": "m", "prompt": "The tide comes in twice a day. " * 30, "max_tokens": 32, "temperature": 0}
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        replies = list(pool.map(lambda _: httpx.post(url + "/v1/completions", json=body, timeout=120), range(n)))
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies if r.status_code != 200]


@pytest.mark.slow
@pytest.mark.parametrize("api_servers", [1, 2])
def test_serve_with_planner_section_decides_under_a_burst(tmp_path, api_servers):
    """With two API servers the planner runs in the launcher's process on every replica's request log,
    and its metrics join theirs in /metrics."""
    pytest.importorskip("tidal.planner.core")
    data = yaml.safe_load((REPO_ROOT / "examples" / "planner.yaml").read_text())
    data.update(model="dummy:tiny-llama", served_model_name="m")
    data["planner"].update(slo={"ttft_ms": 5, "itl_ms": 1}, reactive_interval_s=0.5)
    for worker in data["workers"]:
        worker["num_threads"] = 1
    path = tmp_path / "planner.yaml"
    path.write_text(yaml.safe_dump(data))
    log = tmp_path / "planner.log"
    with running_server(["-f", str(path), "--api-servers", str(api_servers)], log) as url:
        deadline = time.monotonic() + 30
        decided = {}
        while not decided:
            _burst(url, 16)
            decided = {k: v for k, v in metrics(url).items() if k.startswith("tidal_planner_decisions_total") and v}
            assert time.monotonic() < deadline, "no planner decision after 30 s of bursts"
        assert any(k.startswith("tidal_planner_target_workers") for k in metrics(url))
    assert "decision:" in log.read_text()


def test_planner_section_profile_sets_the_performance_model():
    from pathlib import Path

    from tidal.deploy.config import PlannerSection

    profile = Path(__file__).resolve().parents[1] / "benchmarks/results/profile-llama-3.1-8b-NVIDIA-H200.json"
    planner = PlannerSection(profile=str(profile)).make_planner()
    assert planner.perf.prefill_cap_tokens == 1024  # the profile's prefill knee
    assert PlannerSection().make_planner().perf.prefill_cap_tokens == 16384  # the linear default's cap
