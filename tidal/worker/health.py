"""A worker process's optional HTTP health endpoint (for Kubernetes probes).

`HealthServer` serves `GET /live` (200 while the process runs) and `GET /health` (200 once the
engine is loaded and the worker takes requests; 503 while it loads or leaves) on its own thread
and event loop, so it answers while the worker loop is busy in a step or still loading weights.
Lifecycle: `start()` before the engine loads -> the worker sets `status` ("loading" -> "ready" ->
"leaving") -> `close()`. Off unless the worker has a `health_port`.
"""

from __future__ import annotations

import asyncio
import logging
import threading

from aiohttp import web

logger = logging.getLogger(__name__)

STATUSES = ("loading", "ready", "leaving")


class HealthServer:
    def __init__(self, host: str, port: int, worker_id: str):
        self.host = host
        self.port = port  # 0: any free port; the bound one after start()
        self.worker_id = worker_id
        self.status = "loading"  # set by the worker loop (a str assignment: no lock needed)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tidal-health", daemon=True)
        self._runner: web.AppRunner | None = None

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(timeout=30)
        logger.info("health endpoint on http://%s:%d (/live, /health)", self.host, self.port)

    async def _serve(self) -> None:
        app = web.Application()
        app.router.add_get("/live", self._live)
        app.router.add_get("/health", self._health)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def _live(self, _request: web.Request) -> web.Response:
        return web.json_response({"worker_id": self.worker_id, "status": self.status})

    async def _health(self, _request: web.Request) -> web.Response:
        ready = self.status == "ready"
        return web.json_response({"worker_id": self.worker_id, "status": self.status}, status=200 if ready else 503)

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()
