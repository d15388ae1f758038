"""deploy/k8s/: the manifests start exactly the `tidal` commands, with flags the CLI accepts and a
config file the cluster commands resolve; the planner's RBAC covers what its Kubernetes actuator
calls; probes point at the endpoints the processes serve. (No cluster here: the YAML is checked
against the code, not applied.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tidal.cli import build_parser
from tidal.cluster import commands
from tidal.cluster.config import resolve

K8S = Path(__file__).resolve().parents[1] / "deploy" / "k8s"


def _documents() -> list[dict]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def _by_kind(kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in _documents() if d["kind"] == kind}


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    config_map = _by_kind("ConfigMap")["tidal-config"]
    path = tmp_path_factory.mktemp("k8s") / "tidal.yaml"
    path.write_text(config_map["data"]["tidal.yaml"])
    return path


def _containers() -> list[tuple[str, dict]]:
    out = []
    for name, d in {**_by_kind("Deployment"), **_by_kind("StatefulSet")}.items():
        for c in d["spec"]["template"]["spec"]["containers"]:
            out.append((name, c))
    return out


def test_every_object_is_in_the_tidal_namespace():
    for d in _documents():
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == "tidal", d["metadata"]["name"]


def test_tidal_containers_run_the_cluster_commands_with_valid_flags_and_config(config_file):
    parser = build_parser()
    seen = set()
    for name, c in _containers():
        if c["image"].split(":")[0] != "tidal":
            continue
        args = [re.sub(r"\$\((\w+)\)", lambda m: {"POD_NAME": "tidal-decode-abc", "POD_IP": "10.1.2.3"}[m.group(1)], a)
                for a in c["args"]]
        assert args[:3] == [args[0], "--config", "/etc/tidal/tidal.yaml"], name
        args[2] = str(config_file)
        parsed = parser.parse_args(args)  # exits (fails the test) on an unknown flag
        overrides = {"worker": commands._worker_overrides, "frontend": commands._frontend_overrides,
                     "planner": commands._planner_overrides}[parsed.command](parsed)
        settings = resolve(parsed.config, overrides, ("nats",) if parsed.command == "planner" else ("etcd", "nats"))
        seen.add((parsed.command, getattr(parsed, "role", None)))
        if parsed.command == "worker":
            w = settings.worker
            assert w.worker_id == "tidal-decode-abc" and w.advertise_host == "10.1.2.3"
            ports = {p["name"]: p["containerPort"] for p in c["ports"]}
            assert (ports["requests"], ports["kv"], ports["health"]) == (w.port, w.kv_port, w.health_port)
            assert {c["livenessProbe"]["httpGet"]["path"], c["readinessProbe"]["httpGet"]["path"]} == {"/live", "/health"}
            spec = _by_kind("Deployment")[name]["spec"]["template"]["spec"]
            assert spec["terminationGracePeriodSeconds"] > w.stop_grace_s  # the drain finishes before SIGKILL
        if parsed.command == "planner":
            k = settings.planner.kubernetes
            assert settings.planner.actuator == "kubernetes" and k.namespace == "tidal"
            assert {k.prefill_deployment, k.decode_deployment} <= set(_by_kind("Deployment"))
            assert c["ports"][0]["containerPort"] == settings.planner.port
        if parsed.command == "frontend":
            assert c["ports"][0]["containerPort"] == settings.frontend.port
    assert seen == {("worker", "prefill"), ("worker", "decode"), ("frontend", None), ("planner", None)}


def test_services_the_config_names_exist(config_file):
    settings = resolve(str(config_file), {})
    services = {name: d for name, d in _by_kind("Service").items()}
    for url in [*settings.cluster.etcd, settings.cluster.nats]:
        host, port = re.match(r"\w+://([^:/]+):(\d+)", url).groups()
        assert host in services, url
        assert int(port) in [p["port"] for p in services[host]["spec"]["ports"]], url


def test_planner_rbac_covers_its_actuator():
    # KubernetesActuator: PATCH deployments/<prefill|decode> (replicas) and PATCH pods/<id> (deletion cost).
    [role] = _by_kind("Role").values()
    rules = {(g, r): set(rule["verbs"]) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    assert "patch" in rules[("apps", "deployments")] and "patch" in rules[("", "pods")]
    [binding] = _by_kind("RoleBinding").values()
    planner = _by_kind("Deployment")["tidal-planner"]["spec"]["template"]["spec"]
    assert binding["subjects"][0]["name"] == planner["serviceAccountName"] == "tidal-planner"


def test_planes_bind_the_pod_ip_and_take_their_keys_from_secrets(config_file):
    settings = resolve(str(config_file), {})
    planes = settings.cluster.plane_config()
    assert settings.worker.host is None  # binds $POD_IP, not every interface
    secret_files = {"tidal-curve": planes.curve_key_dir, "tidal-nats": planes.nats_auth.token_file.rsplit("/", 1)[0]}
    for name, c in _containers():
        if c["image"].split(":")[0] != "tidal":
            continue
        spec = _by_kind("Deployment")[name]["spec"]["template"]["spec"]
        volumes = {v["name"]: v.get("secret", {}).get("secretName") for v in spec["volumes"]}
        mounted = {volumes[m["name"]]: m["mountPath"] for m in c["volumeMounts"] if volumes[m["name"]]}
        needed = {"tidal-nats"} if c["args"][0] == "planner" else {"tidal-curve", "tidal-nats"}
        assert mounted == {secret: secret_files[secret] for secret in needed}, name
        if c["args"][0] == "worker":
            env = {e["name"]: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") for e in c["env"]}
            assert env["POD_IP"] == "status.podIP"  # the downward API
    nats = _by_kind("Deployment")["tidal-nats"]["spec"]["template"]["spec"]["containers"][0]
    assert nats["env"][0]["valueFrom"]["secretKeyRef"] == {"name": "tidal-nats", "key": "token"}
    assert "$NATS_TOKEN" in _by_kind("ConfigMap")["tidal-nats-config"]["data"]["nats.conf"]
