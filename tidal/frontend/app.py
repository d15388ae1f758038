"""The OpenAI-compatible HTTP server: app factory and uvicorn runner.

`build_app` wires one engine client, one tokenizer and one served model name into a FastAPI
app with its own metrics registry; the caller owns the engine's lifecycle (start it before
serving, shut it down after `serve_http` returns). Endpoints:

    POST /v1/chat/completions   POST /v1/completions   GET /v1/models[/{model}]
    GET /health (ready to serve: 200, else 503)   GET /live (the process runs)
    GET /metrics                GET /version
    GET /admin/workers          (each worker's role and load, when the engine is a router)
    POST /tokenize              POST /detokenize   (vLLM's shapes: `serving_tokenize.py`)

API keys, the admin routes' loopback rule, per-key limits and CORS: `access.py`; TLS: uvicorn's,
from `ServerConfig.ssl_*`; `ServerConfig.chat_template` replaces the model's chat template.

Every error is answered in OpenAI's JSON shape (see `errors.py`); request bodies above
`ServerConfig.max_request_body_bytes` are refused with 413 before any handler runs, request heads
above `max_request_header_bytes` with 431 before any parsing (`http_protocol.py`).
"""

from __future__ import annotations

import functools
import gc
import logging
from typing import Any

import uvicorn
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tidal.config import ServerConfig
from tidal.frontend.access import install_access_control
from tidal.frontend.chat_tokens import ChatTokenCache
from tidal.frontend.detokenizer import TokenTextTable
from tidal.frontend.engine_client import EngineClient
from tidal.frontend.errors import (OpenAIError, engine_unavailable, install_exception_handlers,
                                   model_not_found, request_too_large)
from tidal.frontend.metrics import CONTENT_TYPE, FrontendMetrics
from tidal.frontend.openai_types import ModelCard, ModelList
from tidal.frontend.request_log import RequestLog
from tidal.frontend.serving import ClientDisconnected, ServingContext, error_for, json_response
from tidal.frontend.serving_chat import ChatServing
from tidal.frontend.serving_completion import CompletionServing
from tidal.frontend.serving_tokenize import TokenizeServing
from tidal.frontend.special_token_mask import SpecialTokenMask
from tidal.tokenizer import with_chat_template

logger = logging.getLogger(__name__)

try:
    # The C HTTP parser (h11 costs ~10 us more CPU per streamed chunk), with a limit on request heads.
    from tidal.frontend.http_protocol import HeadLimitedHttpToolsProtocol
except ImportError:  # no httptools: h11, whose own head limit answers 400
    HeadLimitedHttpToolsProtocol = None

GRACEFUL_SHUTDOWN_TIMEOUT_S = 10
"""How long shutdown waits for open responses before cancelling them (which aborts them)."""

_DRAIN_LIMIT_FACTOR = 4
"""An oversized body up to this many times the limit is read and dropped before the 413, so
the client (still sending) reliably gets the answer instead of a reset connection."""


def _version() -> str:
    try:
        from tidal import __version__
    except ImportError:
        return "unknown"
    return __version__


class BodySizeLimitMiddleware:
    """Refuses bodies over `max_body_bytes` with 413, by Content-Length and by bytes read.

    The body is read here, whole, before the app runs (it is small: a prompt), and replayed
    to the app; later `receive()` calls go to the server, so disconnects are still seen.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            if declared <= limit * _DRAIN_LIMIT_FACTOR:
                await self._discard_body(receive)
            await self._refuse(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > limit:
                if size <= limit * _DRAIN_LIMIT_FACTOR and message.get("more_body", False):
                    await self._discard_body(receive, size)
                await self._refuse(scope, receive, send)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _discard_body(self, receive: Receive, size: int = 0) -> None:
        while size <= self.max_body_bytes * _DRAIN_LIMIT_FACTOR:
            message = await receive()
            size += len(message.get("body", b""))
            if message["type"] == "http.disconnect" or not message.get("more_body", False):
                return

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        err = request_too_large(self.max_body_bytes)
        response = JSONResponse(err.body(), status_code=413, headers={"Connection": "close"})
        await response(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def build_app(engine: EngineClient, tokenizer: Any, served_model_name: str,
              server_config: ServerConfig) -> FastAPI:
    """The HTTP app for one engine; `tokenizer` follows `tidal.tokenizer`'s interface."""
    app = FastAPI(title="Tidal", version=_version())
    metrics = FrontendMetrics(engine, served_model_name)
    if server_config.chat_template is not None:
        tokenizer = with_chat_template(tokenizer, server_config.chat_template)
    ctx = _serving_context(engine, tokenizer, served_model_name, metrics, server_config)
    chat = ChatServing(ctx)
    completion = CompletionServing(ctx)
    tokenize = TokenizeServing(ctx, chat)
    app.state.serving_context = ctx
    install_exception_handlers(app)
    app.add_middleware(BodySizeLimitMiddleware,
                       max_body_bytes=server_config.max_request_body_bytes)
    install_access_control(app, server_config)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _answer(chat.create, request, ctx.request_log)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _answer(completion.create, request, ctx.request_log)

    _add_tokenize_routes(app, tokenize)

    @app.get("/v1/models")
    async def list_models() -> Response:
        return json_response(ModelList(data=[_model_card(ctx)]))

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> Response:
        if model != served_model_name:
            return model_not_found(model).response()
        return json_response(_model_card(ctx))

    @app.get("/live")
    async def live() -> Response:
        return JSONResponse({"status": "live"})

    @app.get("/health")
    async def health() -> Response:
        return _health_response(engine)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/admin/workers")
    async def workers() -> Response:
        """Each worker's role and latest load report (engines that front several workers)."""
        table = getattr(engine, "worker_table", None)
        return JSONResponse({"workers": table() if table is not None else []})

    @app.get("/version")
    async def version() -> Response:
        return JSONResponse({"version": _version()})

    return app


def _add_tokenize_routes(app: FastAPI, tokenize: TokenizeServing) -> None:
    @app.post("/tokenize")
    async def tokenize_prompt(request: Request) -> Response:
        return await _answer(tokenize.tokenize, request)

    @app.post("/detokenize")
    async def detokenize_tokens(request: Request) -> Response:
        return await _answer(tokenize.detokenize, request)


def _serving_context(engine: EngineClient, tokenizer: Any, served_model_name: str,
                     metrics: FrontendMetrics, server_config: ServerConfig) -> ServingContext:
    mask = None if server_config.parse_special_tokens_in_content else SpecialTokenMask.for_tokenizer(tokenizer)
    return ServingContext(engine=engine, tokenizer=tokenizer, served_model_name=served_model_name, metrics=metrics,
                          token_table=TokenTextTable(tokenizer), server=server_config, special_token_mask=mask,
                          chat_tokens=ChatTokenCache(tokenizer, mask) if hasattr(tokenizer, "backend") else None,
                          max_request_priority=server_config.max_request_priority,
                          request_log=RequestLog(server_config.log_requests))


def _health_response(engine: EngineClient) -> Response:
    """Ready to serve: a router needs a worker of every role it can't do without (one that
    decodes); a single engine must be up. 503 otherwise."""
    readiness = getattr(engine, "readiness", None)
    ready, workers = readiness() if readiness is not None else (engine.is_healthy(), None)
    if ready:
        return JSONResponse({"status": "ready"} if workers is None else {"status": "ready", "workers": workers})
    err = engine_unavailable("Not ready: no worker can serve requests." if workers is not None
                             else "The engine is not healthy.")
    return err.response()


def _model_card(ctx: ServingContext) -> ModelCard:
    return ModelCard(id=ctx.served_model_name, created=ctx.created, root=ctx.served_model_name,
                     max_model_len=ctx.engine.max_model_len)


async def _answer(handler, request: Request, request_log: RequestLog | None = None) -> Response:
    """Runs an endpoint; every failure becomes an OpenAI error response. With `request_log` (the
    generation endpoints), a refusal before the engine (an `OpenAIError`) gets its request-log line
    here; the engine's own failures get theirs from `GenerationRun`."""
    try:
        return await handler(request)
    except OpenAIError as exc:
        if request_log is not None:
            request_log.refused(request.url.path, exc.status_code, exc.error_type, exc.message, exc.param)
        return exc.response()
    except ClientDisconnected:
        return Response(status_code=499)  # nobody reads it; the engine request was aborted
    except Exception as exc:
        return error_for(exc).response()


class _Server(uvicorn.Server):
    """uvicorn re-raises the signal it caught once it has shut down, which would end the process
    before the caller stops what it started (the engine worker). Shut down, don't re-raise."""

    def handle_exit(self, sig, frame) -> None:
        super().handle_exit(sig, frame)
        self._captured_signals.clear()


def make_http_server(app: FastAPI, server_config: ServerConfig) -> uvicorn.Server:
    """A uvicorn server for `app`: no access log (the request log, `request_log.py`, has a line per
    request); graceful shutdown on SIGINT/SIGTERM."""
    head_limit = server_config.max_request_header_bytes
    http = "h11" if HeadLimitedHttpToolsProtocol is None else functools.partial(
        HeadLimitedHttpToolsProtocol, max_head_bytes=head_limit)
    config = uvicorn.Config(
        app, host=server_config.host, port=server_config.port,
        log_level=server_config.log_level.lower(), access_log=False, lifespan="off",
        log_config=None,  # uvicorn's lines go to the process's own handler (`tidal.logs`: text or JSON)
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_TIMEOUT_S, http=http, h11_max_incomplete_event_size=head_limit,
        headers=[list(header) for header in server_config.response_headers],
        ssl_keyfile=server_config.ssl_keyfile, ssl_certfile=server_config.ssl_certfile,
        ssl_ca_certs=server_config.ssl_ca_certs, ssl_cert_reqs=server_config.ssl_cert_reqs)
    return _Server(config)


async def serve_http(app: FastAPI, server_config: ServerConfig, sockets: list | None = None) -> None:
    """Serves until SIGINT/SIGTERM, then finishes open responses (up to a timeout). `sockets`: listen
    on these (an API server's share of the port) instead of binding host:port."""
    # What start-up built (tokenizer vocabulary, app, router: ~270k objects) lives as long as the
    # process: take it out of the cyclic GC, whose full collections would walk it again and again.
    gc.freeze()
    await make_http_server(app, server_config).serve(sockets=sockets)


def run_server(engine: EngineClient, tokenizer: Any, served_model_name: str,
               server_config: ServerConfig) -> None:
    """Blocking helper for engines that need no start-up on the server's event loop."""
    import asyncio

    asyncio.run(serve_http(build_app(engine, tokenizer, served_model_name, server_config),
                           server_config))
