"""CORS (`ServerConfig.allowed_origins`, Starlette's middleware) and TLS (`ssl_keyfile`/`ssl_certfile`,
uvicorn's), with API keys: a preflight needs no key, a refusal still carries the CORS headers, and the
official `openai` client talks HTTPS to a self-signed certificate it was given (streaming too).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import ssl
import subprocess

import httpx
import openai
import pytest
from test_frontend_unit import MODEL, ScriptedEngine, chat_body, make_app

from tidal.config import ServerConfig
from tidal.frontend.app import make_http_server

ORIGIN = "https://ui.example"
KEY = "sk-tls"
QUESTION = [{"role": "user", "content": "What is the capital?"}]


@pytest.fixture
def engine() -> ScriptedEngine:
    return ScriptedEngine()


def _http(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


# ---- CORS ----------------------------------------------------------------------------------------


async def test_no_cors_headers_by_default(engine):
    async with _http(make_app(engine)) as http:
        reply = await http.post("/v1/chat/completions", json=chat_body(), headers={"Origin": ORIGIN})
        assert reply.status_code == 200
        assert not any(name.startswith("access-control-") for name in reply.headers)
        preflight = await http.options("/v1/chat/completions", headers={
            "Origin": ORIGIN, "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in preflight.headers


async def test_preflight_is_answered_without_a_key_and_refusals_carry_cors(engine):
    app = make_app(engine, api_keys=(KEY,), allowed_origins=(ORIGIN,), allowed_methods=("GET", "POST"),
                   allowed_headers=("authorization", "content-type"))
    async with _http(app) as http:
        preflight = await http.options("/v1/chat/completions", headers={
            "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == ORIGIN
        assert set(preflight.headers["access-control-allow-methods"].replace(" ", "").split(",")) >= {"GET", "POST"}
        assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
        assert "access-control-allow-credentials" not in preflight.headers
        refused = await http.post("/v1/chat/completions", json=chat_body(), headers={"Origin": ORIGIN})
        assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == ORIGIN
        served = await http.post("/v1/chat/completions", json=chat_body(),
                                 headers={"Origin": ORIGIN, "Authorization": f"Bearer {KEY}"})
        assert served.status_code == 200 and served.headers["access-control-allow-origin"] == ORIGIN
        other = await http.options("/v1/chat/completions", headers={
            "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
        assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
        odd_method = await http.options("/v1/chat/completions", headers={
            "Origin": ORIGIN, "Access-Control-Request-Method": "DELETE"})
        assert odd_method.status_code == 400


async def test_any_origin_with_credentials(engine):
    app = make_app(engine, allowed_origins=("*",), allow_credentials=True)
    async with _http(app) as http:
        reply = await http.get("/v1/models", headers={"Origin": ORIGIN})
        # with credentials a browser needs the origin itself, never `*`
        assert reply.headers["access-control-allow-origin"] == ORIGIN
        assert reply.headers["access-control-allow-credentials"] == "true"


# ---- TLS -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 and localhost: (certfile, keyfile)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"], check=True, capture_output=True)
    return str(cert), str(key)


@contextlib.asynccontextmanager
async def tls_server(app, certfile: str, keyfile: str):
    """The app on a real uvicorn with TLS, on a free port, in this event loop: its https URL."""
    server = make_http_server(app, ServerConfig(port=0, log_level="warning", ssl_certfile=certfile,
                                                ssl_keyfile=keyfile))
    server.capture_signals = contextlib.nullcontext  # leave pytest's signal handlers alone
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), "uvicorn failed to start"
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"https://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


async def test_openai_client_over_tls_with_the_servers_certificate(engine, certificate):
    certfile, keyfile = certificate
    app = make_app(engine, api_keys=(KEY,))
    trusted = ssl.create_default_context(cafile=certfile)
    async with tls_server(app, certfile, keyfile) as url:
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0,
                                      http_client=httpx.AsyncClient(verify=trusted)) as client:
            reply = await client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8)
            assert reply.choices[0].message.content
            chunks = [c async for c in await client.chat.completions.create(
                model=MODEL, messages=QUESTION, max_tokens=8, stream=True)]
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
                reply.choices[0].message.content
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="sk-wrong", max_retries=0,
                                      http_client=httpx.AsyncClient(verify=trusted)) as client:
            with pytest.raises(openai.AuthenticationError):
                await client.models.list()
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0,
                                      http_client=httpx.AsyncClient()) as client:
            with pytest.raises(openai.APIConnectionError):  # the system's CAs don't know the certificate
                await client.models.list()
        async with httpx.AsyncClient(timeout=10) as plain:
            with pytest.raises(httpx.HTTPError):  # plain HTTP on the TLS port gets no answer
                await plain.get(url.replace("https://", "http://") + "/health")
        async with httpx.AsyncClient(verify=trusted) as http:
            assert (await http.get(url + "/health")).status_code == 200  # still serving


def test_tls_files_go_together():
    with pytest.raises(ValueError, match="go together"):
        ServerConfig(ssl_certfile="cert.pem")
