"""Cluster mode's listeners and plane security: where a worker binds, ZMQ CURVE on the request
plane, the zmq KV transfer and the ZMQ event plane (a client without the cluster's keys gets
nothing through, and the server keeps serving), NATS credentials from files, and settings that
carry paths, never secrets."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.request

import aetcd
import pytest
import torch

from tests._cluster import Service, _port_open, find_binary, make_etcd
from tidal.cluster.config import listen_host, resolve
from tidal.cluster.keys import write_keys
from tidal.cluster.worker_main import worker_spec
from tidal.config import CacheConfig, EngineConfig, EtcdAuth, NatsAuth, PlaneConfig
from tidal.curve import CurveKeys
from tidal.protocol import AddRequest, EngineStats, KVLayout, LoadReport, SamplingParams, WorkerInfo
from tidal.runtime.credentials import nats_options, read_secret
from tidal.runtime.etcd_cache import EtcdConnection
from tidal.runtime.events import ZmqEventPublisher, ZmqEventSubscriber
from tidal.runtime.nats_client import NatsConnection
from tidal.runtime.ports import free_port
from tidal.runtime.worker_client import WorkerClient
from tidal.sim.timing import TimingModel
from tidal.sim.workers import SimWorkerSetup, start_sim_worker
from tidal.transfer import KVTransferConfig, KVTransferError, create_kv_transfer
from tidal.worker.worker import StopFlag, WorkerSpec

REFUSED_WAIT_S = 1.5  # how long a client without the keys waits to see that nothing comes back
CLUSTER = {"etcd": ["http://127.0.0.1:2379"], "nats": "nats://127.0.0.1:4222"}


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> CurveKeys:
    folder = tmp_path_factory.mktemp("curve")
    write_keys(str(folder))
    return CurveKeys.load(str(folder))


@pytest.fixture(scope="module")
def other_keys(tmp_path_factory) -> CurveKeys:
    """Another cluster's keys: another server key, another client key."""
    folder = tmp_path_factory.mktemp("curve-other")
    write_keys(str(folder))
    return CurveKeys.load(str(folder))


# ---- settings -----------------------------------------------------------------------------
def test_worker_listens_on_the_pod_ip_by_default(monkeypatch):
    monkeypatch.setenv("POD_IP", "10.1.2.3")
    assert listen_host(None, ()) == "10.1.2.3"
    assert listen_host("0.0.0.0", ()) == "0.0.0.0"  # named: kept (the worker warns)
    monkeypatch.delenv("POD_IP")
    assert listen_host(None, ("http://127.0.0.1:2379",)) == "127.0.0.1"  # the route towards etcd
    settings = resolve(None, {"cluster": CLUSTER, "model": "dummy:tiny-llama", "worker": {"worker_id": "w"}})
    spec, advertise = worker_spec(settings)
    assert spec.request_addr.startswith("tcp://127.0.0.1:") and spec.health_host == "127.0.0.1"
    assert spec.transfer.zmq_address.startswith("tcp://127.0.0.1:") and advertise == "127.0.0.1"
    assert spec.curve is None and spec.transfer.zmq_curve is None


def test_cluster_section_carries_key_and_credential_paths(tmp_path, keys):
    folder = tmp_path / "curve"
    write_keys(str(folder))
    (tmp_path / "token").write_text("s3cret-token\n")
    settings = resolve(None, {"cluster": {**CLUSTER, "curve_key_dir": str(folder),
                                          "nats_auth": {"token_file": str(tmp_path / "token")},
                                          "etcd_auth": {"user": "tidal", "password_file": str(tmp_path / "token")}},
                              "model": "dummy:tiny-llama", "worker": {"host": "127.0.0.1"}})
    planes = settings.cluster.plane_config()
    assert planes.nats_auth.token_file == str(tmp_path / "token") and planes.etcd_auth.user == "tidal"
    assert "s3cret" not in repr(settings.model_dump()) + repr(planes)
    spec, _ = worker_spec(settings)
    assert spec.curve is not None and spec.transfer.zmq_curve == spec.curve
    assert b"" + spec.curve.server_secret not in repr(spec).encode()
    assert nats_options(planes.nats_auth) == {"token": "s3cret-token"}
    with pytest.raises(Exception, match="nats_auth"):
        resolve(None, {"cluster": {**CLUSTER, "nats_auth": {"token_file": "t", "creds_file": "c"}}})


def test_unreadable_keys_and_secrets_are_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="server.key_secret"):
        CurveKeys.load(str(tmp_path))
    with pytest.raises(ValueError, match="empty"):
        (tmp_path / "empty").write_text("\n")
        read_secret(str(tmp_path / "empty"))


# ---- request plane --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def curve_worker(keys):
    """A simulated worker (real worker loop and engine, no model) on loopback TCP with CURVE."""
    port = free_port()
    config = EngineConfig(cache=CacheConfig(num_blocks=64))
    spec = WorkerSpec(worker_id="w0", role="both", engine=config, request_addr=f"tcp://127.0.0.1:{port}",
                      event_addr=f"tcp://127.0.0.1:{free_port()}", curve=keys)
    stop = StopFlag()
    thread = start_sim_worker(spec, SimWorkerSetup(config, TimingModel(), 1000.0, 1000, 512), stop, 0)
    yield WorkerInfo(worker_id="w0", role="both", request_addr=spec.request_addr, event_addr=spec.event_addr)
    stop.requested = True
    thread.join(10)


async def _generate(client: WorkerClient, request_id: str) -> list[int]:
    request = AddRequest(request_id=request_id, prompt_token_ids=[1, 2, 3, 4],
                         sampling_params=SamplingParams(max_tokens=3, ignore_eos=True))
    tokens = []
    async for delta in client.generate(request):
        tokens += delta.new_token_ids
    return tokens


async def _refused(info: WorkerInfo, keys: CurveKeys | None) -> bool:
    client = WorkerClient(info, keys=keys)
    try:
        await client.start(timeout_s=REFUSED_WAIT_S)
    except TimeoutError:
        return True
    finally:
        await client.close()
    return False


async def test_curve_worker_serves_keyed_clients_and_no_one_else(curve_worker, keys, other_keys, caplog):
    client = WorkerClient(curve_worker, keys=keys)
    await client.start(timeout_s=10)
    try:
        assert len(await _generate(client, "a")) == 3
        unknown_client = CurveKeys(keys.server_public, keys.server_secret, other_keys.client_public,
                                   other_keys.client_secret, keys.allowed_clients)
        with caplog.at_level(logging.WARNING, logger="tidal.curve"):
            refused = await asyncio.gather(_refused(curve_worker, None), _refused(curve_worker, other_keys),
                                           _refused(curve_worker, unknown_client))
        assert refused == [True, True, True]  # no keys, another cluster's keys, an unknown client key
        assert "unknown public key" in caplog.text
        assert len(await _generate(client, "b")) == 3  # still serving its clients
    finally:
        await client.close()


# ---- KV transfer (zmq backend) ------------------------------------------------------------
LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, num_blocks=8, block_size=4, head_dim=8, dtype="float32")


def test_zmq_kv_pull_needs_the_cluster_keys(keys, other_keys):
    def backend(worker_id: str, curve: CurveKeys | None, timeout_s: float = 5.0):
        return create_kv_transfer(LAYOUT, torch.device("cpu"), worker_id,
                                  KVTransferConfig(backend="zmq", timeout_s=timeout_s, zmq_curve=curve))

    src, dst = backend("prefill-0", keys), backend("decode-0", keys)
    plain, stranger = backend("decode-1", None, REFUSED_WAIT_S), backend("decode-2", other_keys, REFUSED_WAIT_S)
    try:
        src.cache.copy_(torch.arange(src.cache.numel(), dtype=torch.float32).view(src.cache.shape))
        for outsider in (plain, stranger):
            with pytest.raises(KVTransferError, match="sent no KV"):
                outsider.start_pull(src.source_info(), [1, 2], [0, 1]).wait(5)
            assert not outsider.cache.any()
        dst.start_pull(src.source_info(), [1, 2], [0, 1]).wait(5)
        assert torch.equal(dst.cache[:, :, :, [0, 1]], src.cache[:, :, :, [1, 2]])
    finally:
        for b in (src, dst, plain, stranger):
            b.close()


# ---- ZMQ event plane ----------------------------------------------------------------------
async def _received(sub: ZmqEventSubscriber, pub: ZmqEventPublisher, wait_s: float) -> bool:
    stats = EngineStats(num_running=0, num_waiting=0, kv_blocks_used=0, kv_blocks_total=8,
                        prefix_cache_hit_tokens=0, prompt_tokens=0, generation_tokens=0)
    report = LoadReport(worker_id="w0", role="both", stats=stats, time=0.0)
    receiving = asyncio.ensure_future(anext(sub.events()))
    deadline = time.monotonic() + wait_s
    try:
        while time.monotonic() < deadline:
            pub.publish("load", report)  # PUB drops what it sends before the handshake: send until one lands
            done, _ = await asyncio.wait({receiving}, timeout=0.1)
            if done:
                return True
        return False
    finally:
        receiving.cancel()


async def test_zmq_event_plane_needs_the_cluster_keys(keys, other_keys):
    pub = ZmqEventPublisher(f"tcp://127.0.0.1:{free_port()}", keys=keys)
    subs = {name: ZmqEventSubscriber(("load",), keys=k) for name, k in
            (("keyed", keys), ("plain", None), ("stranger", other_keys))}
    try:
        for sub in subs.values():
            sub.connect("w0", pub.address)
        assert await _received(subs["keyed"], pub, 5.0)
        assert not await _received(subs["plain"], pub, REFUSED_WAIT_S)
        assert not await _received(subs["stranger"], pub, REFUSED_WAIT_S)
    finally:
        for sub in subs.values():
            sub.close()
        pub.close()


# ---- NATS credentials -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def nats_with_token(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nats-auth")
    port = free_port()
    argv = [find_binary("nats-server"), "-a", "127.0.0.1", "-p", str(port), "--auth", "tidal-test-token"]
    service = Service("nats-server", argv, port, f"nats://127.0.0.1:{port}", tmp / "nats.log",
                      lambda: _port_open(port))
    service.start()
    (tmp / "token").write_text("tidal-test-token\n")
    (tmp / "wrong").write_text("not-the-token\n")
    yield service, tmp
    service.stop()


async def test_nats_connects_with_the_token_from_its_file_only(nats_with_token, caplog):
    service, tmp = nats_with_token
    good = NatsConnection(PlaneConfig(nats_url=service.url, nats_auth=NatsAuth(token_file=str(tmp / "token"))), "ok")
    await good.connect(timeout_s=5)
    await good.client.publish("tidal.test", b"x")
    await good.close()
    for auth in (NatsAuth(), NatsAuth(token_file=str(tmp / "wrong"))):
        refused = NatsConnection(PlaneConfig(nats_url=service.url, nats_auth=auth), "refused")
        with pytest.raises(TimeoutError):
            await refused.connect(timeout_s=REFUSED_WAIT_S)
        await refused.close()
    assert "not-the-token" not in caplog.text and "tidal-test-token" not in caplog.text


# ---- etcd credentials ------------------------------------------------------------------------
def _etcd_post(url: str, path: str, body: dict) -> None:
    request = urllib.request.Request(f"{url}/v3/{path}", data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 200, path


@pytest.fixture(scope="module")
def etcd_with_auth(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("etcd-auth")
    service = make_etcd(tmp)
    service.start()
    _etcd_post(service.url, "auth/user/add", {"name": "root", "password": "etcd-test-password"})
    _etcd_post(service.url, "auth/user/grant", {"user": "root", "role": "root"})
    _etcd_post(service.url, "auth/enable", {})
    (tmp / "password").write_text("etcd-test-password\n")
    (tmp / "wrong").write_text("not-the-password\n")
    yield service, tmp
    service.stop()


async def test_etcd_accepts_the_user_with_the_password_from_its_file_only(etcd_with_auth):
    service, tmp = etcd_with_auth
    good = EtcdConnection((service.url,), EtcdAuth(user="root", password_file=str(tmp / "password")))
    await good.client.put(b"/tidal/test/key", b"1")
    assert (await good.client.get(b"/tidal/test/key")).value == b"1"
    await good.client.close()
    for auth in (EtcdAuth(), EtcdAuth(user="root", password_file=str(tmp / "wrong"))):
        refused = EtcdConnection((service.url,), auth)
        with pytest.raises(aetcd.ClientError):
            await refused.client.put(b"/tidal/test/key", b"2")
        await refused.client.close()
