"""Deployment configs and discovery: the parts that need no worker process."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from tidal.deploy.config import DeploymentError, load_deployment, parse_deployment
from tidal.protocol import WorkerInfo
from tidal.runtime.discovery import LocalDiscovery

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
