"""Deployment configs and discovery: the parts that need no worker process."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from tidal.config import ServerConfig
from tidal.deploy.config import DeploymentError, load_deployment, parse_deployment
from tidal.planner.types import PlannerConfig
from tidal.protocol import WorkerInfo
from tidal.router.config import RouterConfig
from tidal.router.policy import DisaggPolicy, KVWeights
from tidal.runtime.discovery import LocalDiscovery
from tidal.transfer import KVTransferConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO_ROOT / "examples").rglob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_every_example_is_valid(path):
    deployment = load_deployment(path)
    replicas = deployment.replicas()
    assert replicas and len({worker_id for worker_id, _, _ in replicas}) == len(replicas)
    for _, section, device in replicas:
        config = deployment.engine_config(section, device)
        assert config.model.device == device
        assert (device == "cpu") == ("gpu" not in path.parts)


def test_worker_overrides_merge_over_the_shared_engine_section():
    d = parse_deployment({"engine": {"token_budget": 128, "block_size": 32},
                          "workers": [{"role": "prefill", "engine": {"token_budget": 1024}}, {"role": "decode"}]})
    (_, prefill, _), (_, decode, _) = d.replicas()
    assert d.engine_config(prefill, "cpu").scheduler.token_budget == 1024
    assert d.engine_config(decode, "cpu").scheduler.token_budget == 128
    assert d.engine_config(decode, "cpu").cache.block_size == 32
    assert [w for w, _, _ in d.replicas()] == ["prefill-0", "decode-0"]


@pytest.mark.parametrize("data, field", [
    ({"workers": [{"role": "prefil"}]}, "workers.0.role"),
    ({"workers": [{"role": "both", "count": 0}]}, "workers.0.count"),
    ({"workers": [{"role": "both", "count": 2, "devices": ["cuda:0"]}]}, "workers.0"),
    ({"workers": [{"role": "both", "devices": ["tpu"]}]}, "workers.0"),
    ({"workers": [{"role": "both", "engine": {"token_budgte": 5}}]}, "workers.0.engine.token_budgte"),
    ({"workers": [{"role": "both"}], "frontend": {"router": "kv_aware"}}, "frontend.router"),
    ({"workers": [{"role": "both"}], "kv_transfer": {"backend": "rdma"}}, "kv_transfer.backend"),
    ({"workers": [{"role": "both"}], "disaggregation": {"local_prefill_threshold": -1}},
     "disaggregation.local_prefill_threshold"),
    ({"workers": []}, "workers"),
    ({"workers": [{"role": "prefill"}]}, "prefill workers need"),
    ({"workerz": [{"role": "both"}]}, "workerz"),
])
def test_bad_configs_name_the_field(data, field):
    with pytest.raises(DeploymentError) as err:
        parse_deployment(data, "my.yaml")
    assert str(err.value).startswith("my.yaml: ") and field in str(err.value)


@pytest.mark.parametrize("section, key, field, value, build", [
    ("frontend", "port", "port", 70000, lambda v: ServerConfig(port=v)),
    ("frontend", "api_servers", "api_servers", 0, lambda v: ServerConfig(api_servers=v)),
    ("frontend", "queue_timeout_s", "queue_timeout_s", 0, lambda v: RouterConfig(queue_timeout_s=v)),
    ("frontend", "router", "policy", "kv_aware", lambda v: RouterConfig(policy=v)),
    ("frontend", "kv_overlap_weight", "overlap_weight", -1, lambda v: KVWeights(overlap_weight=v)),
    ("disaggregation", "max_prefill_queue_tokens", "max_prefill_queue_tokens", 0,
     lambda v: DisaggPolicy(max_prefill_queue_tokens=v)),
    ("kv_transfer", "timeout_s", "timeout_s", 0, lambda v: KVTransferConfig(timeout_s=v)),
    ("planner", "decode_prefill_share", "decode_prefill_share", 1.5, lambda v: PlannerConfig(decode_prefill_share=v)),
])
def test_a_dataclass_bound_holds_in_yaml_and_in_python_alike(section, key, field, value, build):
    """The bound is written once, on the dataclass: the YAML section derived from it refuses the
    value (naming the section's key), and so does the dataclass built directly (naming its field)."""
    with pytest.raises(DeploymentError, match=f"{section}.{key}"):
        parse_deployment({"workers": [{"role": "both"}], section: {key: value}}, "my.yaml")
    with pytest.raises(ValueError, match=field):
        build(value)


def test_sections_default_to_their_dataclasses_defaults():
    d = parse_deployment({"workers": [{"role": "both"}], "planner": {}})
    assert d.server_config() == ServerConfig()
    assert d.router_config() == RouterConfig()
    assert d.transfer_config("/x") == KVTransferConfig(scratch_dir="/x")
    assert d.planner.planner_config() == PlannerConfig()


def test_cli_refuses_a_bad_config_with_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("workers:\n  - role: both\n    count: two\n")
    proc = subprocess.run([sys.executable, "-m", "tidal.cli", "serve", "-f", str(bad)], capture_output=True,
                          text=True, cwd=REPO_ROOT, timeout=120)
    assert proc.returncode == 2
    assert "workers.0.count" in proc.stderr and str(bad) in proc.stderr
    missing = subprocess.run([sys.executable, "-m", "tidal.cli", "serve", "-f", str(tmp_path / "nope.yaml")],
                             capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert missing.returncode == 2 and "cannot read" in missing.stderr


def test_local_discovery_watch_sees_existing_and_new_workers():
    async def scenario():
        discovery = LocalDiscovery()
        info = WorkerInfo(worker_id="a", role="both", request_addr="ipc://x", event_addr="ipc://y")
        await discovery.register(info)
        watch = discovery.watch()
        first = await anext(watch)
        await discovery.register(WorkerInfo(worker_id="b", role="decode", request_addr="ipc://z", event_addr="ipc://w"))
        await discovery.unregister("a", "exited with code 1")
        second, third = await anext(watch), await anext(watch)
        await watch.aclose()
        return first, second, third, discovery.list()

    first, second, third, left = asyncio.run(scenario())
    assert (first.kind, first.worker.worker_id) == ("added", "a")
    assert (second.kind, second.worker.worker_id) == ("added", "b")
    assert (third.kind, third.reason) == ("removed", "exited with code 1")
    assert [w.worker_id for w in left] == ["b"]
