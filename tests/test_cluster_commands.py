"""The cluster commands' parts that need no server: settings (file, flags over it), the worker's
addresses and KV backend, the planner's frontend follower and log-only actuator, and the
control-plane messages' encoding."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
import yaml
from prometheus_client import CollectorRegistry

from tidal.cli import main
from tidal.cluster.config import advertised_host, resolve
from tidal.protocol import ObservationMessage
from tidal.cluster.planner_main import FrontendMerger, LogOnlyActuator
from tidal.cluster.worker_main import worker_spec
from tidal.deploy.config import DeploymentError
from tidal.planner.types import FrontendObservation, Observation, WorkerObservation

CLUSTER = {"etcd": ["http://10.0.0.5:2379"], "nats": "nats://10.0.0.5:4222", "namespace": "prod"}


def _file(tmp_path, data: dict) -> str:
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_flags_override_the_file(tmp_path):
    path = _file(tmp_path, {"cluster": CLUSTER, "model": "dummy:tiny-llama", "engine": {"token_budget": 128},
                            "worker": {"role": "prefill", "port": 7000}})
    settings = resolve(path, {"cluster": {"namespace": "staging", "nats": None},
                              "worker": {"role": "decode", "port": None}, "engine": {"token_budget": None}})
    assert settings.cluster.plane_config().namespace == "staging"
    assert settings.cluster.nats == CLUSTER["nats"]
    assert (settings.worker.role, settings.worker.port) == ("decode", 7000)
    assert settings.engine.token_budget == 128


def test_bad_values_and_missing_services_are_refused(tmp_path):
    with pytest.raises(DeploymentError, match="worker.role"):
        resolve(_file(tmp_path, {"cluster": CLUSTER, "worker": {"role": "prefil"}}), {})
    with pytest.raises(DeploymentError, match="--nats URL"):
        resolve(None, {"cluster": {"etcd": ["http://127.0.0.1:2379"]}})
    with pytest.raises(DeploymentError, match="namespace"):
        resolve(None, {"cluster": {**CLUSTER, "namespace": "a.b"}})


def test_cli_exits_2_without_etcd(capsys):
    assert main(["frontend", "--nats", "nats://127.0.0.1:4222"]) == 2
    assert "--etcd URL" in capsys.readouterr().err


def test_worker_binds_a_wildcard_and_advertises_a_dialable_host():
    settings = resolve(None, {"cluster": CLUSTER, "model": "dummy:tiny-llama",
                              "worker": {"role": "decode", "host": "0.0.0.0", "port": 7100,
                                         "advertise_host": "node-7", "worker_id": "d7"}})
    spec, advertise = worker_spec(settings)
    assert (spec.request_addr, spec.advertise_addr, advertise) == ("tcp://*:7100", "tcp://node-7:7100", "node-7")
    assert spec.transfer.backend == "zmq" and spec.transfer.zmq_address == "tcp://*:*"
    assert spec.transfer.zmq_advertise_host == "node-7"
    assert spec.engine.model.model == "dummy:tiny-llama" and spec.worker_id == "d7"
    assert advertised_host("10.1.2.3", ()) == "10.1.2.3"
    assert advertised_host("0.0.0.0", ("http://127.0.0.1:2379",)) == "127.0.0.1"


def test_planner_merges_the_frontends_it_hears():
    def message(frontend_id: str, **front) -> tuple[str, Observation]:
        obs = Observation(time_s=1.0, interval_s=1.0, frontend=FrontendObservation(**front),
                          workers=(WorkerObservation(worker_id="d0", role="decode"),))
        return frontend_id, obs

    merger = FrontendMerger(interval_s=1.0)
    # "a" is the clock (the smallest id): its report alone steps, then merged with b's latest.
    alone = merger.accept(*message("a", request_rate=2.0, num_requests=2, ttft_ms_p90=100.0, isl_mean=1000.0), 0.0)
    assert alone.frontend.request_rate == 2.0
    assert merger.accept(*message("b", request_rate=6.0, num_requests=6, ttft_ms_p90=300.0, isl_mean=2000.0,
                                 queue_depth=3), 0.5) is None
    merged = merger.accept(*message("a", request_rate=2.0, num_requests=2, ttft_ms_p90=100.0, isl_mean=1000.0), 1.0)
    # rates and queues add up; the worst p90; ISL weighted by requests: (2 x 1000 + 6 x 2000) / 8 = 1750
    assert merged.frontend.request_rate == 8.0 and merged.frontend.queue_depth == 3
    assert merged.frontend.ttft_ms_p90 == 300.0 and merged.frontend.isl_mean == 1750.0
    assert merged.workers == (WorkerObservation(worker_id="d0", role="decode"),)
    # a goes quiet: b becomes the clock and steps alone
    later = 1.0 + merger.timeout_s + 0.1
    alone_b = merger.accept(*message("b", request_rate=6.0, num_requests=6), later)
    assert alone_b.frontend.request_rate == 6.0 and list(merger.latest) == ["b"]


def test_observation_round_trips_through_msgpack():
    obs = Observation(time_s=5.0, interval_s=2.0, frontend=FrontendObservation(request_rate=1.5, ttft_ms_p90=80.0),
                      workers=(WorkerObservation(worker_id="d0", role="decode", state="flipping", steps=3),))
    message = ObservationMessage(frontend_id="f", observation=msgspec.Raw(msgspec.msgpack.encode(obs)))
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(message), type=ObservationMessage)
    assert decoded.frontend_id == "f" and msgspec.msgpack.decode(decoded.observation, type=Observation) == obs


def test_log_only_actuator_counts_and_changes_nothing():
    registry = CollectorRegistry()
    actuator = LogOnlyActuator(registry)
    asyncio.run(actuator.add_worker("prefill"))
    asyncio.run(actuator.remove_worker("d3"))
    assert registry.get_sample_value("tidal_planner_log_only_actions_total", {"action": "add", "role": "prefill"}) == 1
    assert registry.get_sample_value("tidal_planner_log_only_actions_total", {"action": "remove", "role": "-"}) == 1
