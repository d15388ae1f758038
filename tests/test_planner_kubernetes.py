"""The Kubernetes actuator against a fake API server (a FastAPI app behind httpx's ASGI transport):
it reads and patches `spec.replicas` of the prefill and decode Deployments with the bearer token,
marks a removed worker's pod for deletion first, and a flip is one replica down on one Deployment
and one up on the other."""

from __future__ import annotations

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from tidal.planner.actuators import (DELETION_COST_ANNOTATION, ActuatorError, KubernetesActuator,
                                     KubernetesConfig)

NS = "llm"


def _fake_api(replicas: dict[str, int], patches: list, tokens: list):
    app = FastAPI()

    @app.get("/apis/apps/v1/namespaces/{ns}/deployments/{name}")
    async def get_deployment(ns: str, name: str, request: Request):
        tokens.append(request.headers.get("authorization"))
        if ns != NS or name not in replicas:
            return JSONResponse({"kind": "Status", "code": 404}, status_code=404)
        return {"kind": "Deployment", "metadata": {"name": name, "namespace": ns}, "spec": {"replicas": replicas[name]}}

    @app.patch("/apis/apps/v1/namespaces/{ns}/deployments/{name}")
    async def patch_deployment(ns: str, name: str, request: Request):
        body = await request.json()
        patches.append(("deployment", name, request.headers["content-type"], body))
        replicas[name] = body["spec"]["replicas"]
        return {"kind": "Deployment", "spec": {"replicas": replicas[name]}}

    @app.patch("/api/v1/namespaces/{ns}/pods/{name}")
    async def patch_pod(ns: str, name: str, request: Request):
        patches.append(("pod", name, request.headers["content-type"], await request.json()))
        if not name.startswith("tidal-"):
            return JSONResponse({"kind": "Status", "code": 404}, status_code=404)
        return {"kind": "Pod", "metadata": {"name": name}}

    return app


@pytest.fixture()
def k8s():
    replicas = {"tidal-prefill": 1, "tidal-decode": 2}
    patches, tokens = [], []
    actuator = KubernetesActuator(
        KubernetesConfig(namespace=NS, base_url="http://fake-apiserver", token="s3cret"),
        transport=httpx.ASGITransport(app=_fake_api(replicas, patches, tokens)))
    return actuator, replicas, patches, tokens


async def test_add_remove_and_flip_patch_replicas(k8s):
    actuator, replicas, patches, tokens = k8s
    await actuator.add_worker("decode")
    assert replicas == {"tidal-prefill": 1, "tidal-decode": 3}
    assert patches[-1] == ("deployment", "tidal-decode", "application/merge-patch+json",
                           {"spec": {"replicas": 3}})
    await actuator.remove_worker("tidal-prefill-7d9f-abcde")
    assert replicas == {"tidal-prefill": 0, "tidal-decode": 3}
    assert patches[-2] == ("pod", "tidal-prefill-7d9f-abcde", "application/merge-patch+json",
                           {"metadata": {"annotations": {DELETION_COST_ANNOTATION: "-1000"}}})
    result = await actuator.flip_worker("tidal-decode-7d9f-xyz12", "prefill")
    assert replicas == {"tidal-prefill": 1, "tidal-decode": 2}
    assert [p[:2] for p in patches[-3:]] == [("pod", "tidal-decode-7d9f-xyz12"), ("deployment", "tidal-decode"),
                                             ("deployment", "tidal-prefill")]
    assert result.role == "prefill" and result.drain_s == 0.0
    assert set(tokens) == {"Bearer s3cret"}
    await actuator.close()


async def test_errors_are_actuator_errors(k8s):
    actuator, replicas, _, _ = k8s
    with pytest.raises(ActuatorError, match="neither"):
        await actuator.remove_worker("someone-else-0")
    del replicas["tidal-decode"]
    with pytest.raises(ActuatorError, match="HTTP 404"):
        await actuator.add_worker("decode")
    with pytest.raises(ActuatorError, match="role 'both'"):
        await actuator.add_worker("both")
    await actuator.close()


def test_outside_a_cluster_without_base_url_is_refused(monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(ActuatorError, match="KUBERNETES_SERVICE_HOST"):
        KubernetesActuator(KubernetesConfig())
