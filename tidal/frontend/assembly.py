"""One frontend, assembled: a tokenizer, a router replica over some discovery, the HTTP app.

Every way Tidal serves HTTP builds its frontend here: `tidal serve` (in the launcher's process with
one API server, or in each API server process: `tidal.frontend.api_server`), `tidal frontend`
(cluster mode, discovery from etcd, events from NATS) and `tidal sim` (simulated workers).
What differs between them is only where the workers are listed (`discovery`), where their events
come from (`events`) and what the caller adds around the frontend (a launcher, a planner, the
control plane).

Lifecycle: `Frontend(spec, discovery, events)` (loads the tokenizer, builds the router) ->
`start()` (the router follows discovery and events; waits until the listed workers are connected,
or only until one tells the model name) -> `serve(sockets)` until SIGINT/SIGTERM -> `close()`.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from tidal.config import ServerConfig
from tidal.router.config import RouterConfig
from tidal.router.service import Router

logger = logging.getLogger(__name__)

MODEL_NAME_POLL_S = 0.2


@dataclass(frozen=True)
class FrontendSpec:
    """What a frontend is built from; plain values, so it crosses a process spawn."""

    model: str | None
    """The served model (GGUF file, HF folder, dummy:ARCH; None: the embedded one), for its tokenizer."""
    tokenizer: str | None
    """A tokenizer folder or .gguf file that overrides the model's own."""
    served_model_name: str | None
    """The name clients use; None: the one the first ready worker reports."""
    router: RouterConfig
    server: ServerConfig


class Frontend:
    def __init__(self, spec: FrontendSpec, discovery, events=None, client_tag: str = "", tokenizer=None,
                 keys=None) -> None:
        """`tokenizer`: one the caller already loaded (else the spec's is loaded here); `keys`: the
        router dials the workers with these CURVE keys (`tidal.curve.CurveKeys`)."""
        from tidal.tokenizer import load_tokenizer

        self.spec = spec
        self.discovery = discovery
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(spec.model, spec.tokenizer)
        self.router = Router(discovery, spec.router, events=events, client_tag=client_tag, keys=keys)
        self.app = None

    @property
    def model_name(self) -> str:
        return self.spec.served_model_name or self.router.model_name

    async def start(self, wait_ready: bool = True) -> None:
        """Follow the workers; `wait_ready`: until every listed worker is connected (one machine),
        else only until the model name is known (cluster mode: workers come and go)."""
        from tidal.frontend.app import build_app

        await self.router.start()
        if wait_ready:
            await self.router.wait_ready()
        elif not self.spec.served_model_name:
            logger.info("waiting for a worker to learn the model name (or pass --served-model-name)")
            while not self.router.model_name:
                await asyncio.sleep(MODEL_NAME_POLL_S)
        self.app = build_app(self.router, self.tokenizer, self.model_name, self.spec.server)

    async def serve(self, sockets: list | None = None) -> None:
        """HTTP until SIGINT/SIGTERM; open responses finish first (up to a timeout)."""
        from tidal.frontend.app import serve_http

        await serve_http(self.app, self.spec.server, sockets)

    async def close(self) -> None:
        await self.router.close()
