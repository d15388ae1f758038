"""`tidal serve`: a deployment on this machine, its workers, its serving tier and its planner.

Owns the launcher (the worker processes), the serving tier and, with a `planner:` section, the
planner service; everything is torn down in reverse order on Ctrl-C/SIGTERM.

The serving tier is `frontend.api_servers` processes (`--api-servers`; default: one per four
cores). With one, the frontend (`Frontend`: tokenizer, router, HTTP app) runs in this process, as
it always has. With several (`ApiServerPool`), each is its own process with its own router replica
on the one shared port, and this process keeps the launcher, the discovery relay and the replica
bus; a planner then gets a router of its own here (a control replica that serves no request: it
drains and flips workers, which every replica sees through the workers' `WorkerDraining` and
`WorkerReady` broadcasts) fed with every replica's request log over the bus.
"""

from __future__ import annotations

import logging

from tidal.deploy import assembly
from tidal.deploy.api_servers import ApiServerPool, default_api_servers
from tidal.deploy.config import Deployment
from tidal.deploy.launcher import Launcher
from tidal.frontend.assembly import Frontend, FrontendSpec
from tidal.runtime.discovery import LocalDiscovery

logger = logging.getLogger(__name__)

CONTROL_CLIENT_TAG = "launcher/"


def frontend_spec(deployment: Deployment, host: str | None = None, port: int | None = None) -> FrontendSpec:
    return FrontendSpec(model=deployment.model, tokenizer=deployment.tokenizer, served_model_name=None,
                        router=deployment.router_config(), server=deployment.server_config(host, port))


def api_server_count(deployment: Deployment, override: int | None = None) -> int:
    if override is not None:
        return override
    return deployment.frontend.api_servers or default_api_servers()


async def serve_deployment(deployment: Deployment, host: str | None = None, port: int | None = None,
                           api_servers: int | None = None) -> None:
    """Workers + serving tier (+ planner) until SIGINT/SIGTERM; then everything stops."""
    spec = frontend_spec(deployment, host, port)
    count = api_server_count(deployment, api_servers)
    if count == 1:
        await _serve_in_process(deployment, spec)
    else:
        await _serve_api_servers(deployment, spec, count)


async def _serve_in_process(deployment: Deployment, spec: FrontendSpec) -> None:
    discovery = LocalDiscovery()
    frontend = Frontend(spec, discovery)
    # The launcher's restart counter joins the router's metrics on /metrics.
    launcher = Launcher(deployment, discovery, log_level=spec.server.log_level.upper(),
                        registry=frontend.router.registry, log_format=spec.server.log_format)
    planner = None
    try:
        await launcher.start()
        await frontend.start()
        _log_serving(frontend.model_name, spec, launcher, 1)
        frontend.app.state.launcher = launcher
        if deployment.planner is not None:
            planner = await start_planner(deployment, launcher, frontend.router)
        await frontend.serve()
    finally:
        if planner is not None:
            await planner.close()
        await frontend.close()
        await launcher.stop()


async def _serve_api_servers(deployment: Deployment, spec: FrontendSpec, count: int) -> None:
    from tidal.frontend.metrics_multiprocess import enable_multiprocess_metrics
    from tidal.router.replicas import RequestLogFeed
    from tidal.router.service import Router

    discovery = LocalDiscovery()
    pool = ApiServerPool(spec, count, discovery, log_level=spec.server.log_level,
                         restarts=deployment.restarts.build())
    # The launcher's metrics (restarts, the planner's) join the API servers' in the metric files.
    enable_multiprocess_metrics(pool.metrics_dir)
    launcher = Launcher(deployment, discovery, log_level=spec.server.log_level.upper(),
                        log_format=spec.server.log_format)
    stop = pool.stop_on_signals()
    control = feed = planner = None
    try:
        await launcher.start()
        if deployment.planner is not None:
            control = Router(launcher.discovery, spec.router, client_tag=CONTROL_CLIENT_TAG)
            await control.start()
            await control.wait_ready()
        await pool.start()
        _log_serving(spec.served_model_name or "the model", spec, launcher, count, pool.port)
        if control is not None:
            feed = RequestLogFeed(control.request_log, pool.bus.out_address)
            await feed.start()
            control.replica_queue_depth = lambda: feed.queue_depth
            planner = await start_planner(deployment, launcher, control)
        await stop.wait()
        logger.info("stopping: API servers first, then the workers")
    finally:
        if planner is not None:
            await planner.close()
        if feed is not None:
            await feed.close()
        await pool.stop()
        if control is not None:
            await control.close()
        await launcher.stop()


def _log_serving(model_name: str, spec: FrontendSpec, launcher: Launcher, count: int, port: int | None = None) -> None:
    logger.info("serving %s on %s://%s:%d with %d workers (%s) and %d API server%s", model_name,
                "https" if spec.server.uses_tls else "http", spec.server.host,
                port or spec.server.port, len(launcher.procs),
                ", ".join(f"{w}={p.spec.role}" for w, p in launcher.procs.items()), count, "s" * (count > 1))


async def start_planner(deployment: Deployment, launcher: Launcher, router):
    """The planner service over this deployment's launcher (or Kubernetes) and router, started."""
    from tidal.planner.actuators import LocalActuator

    section = deployment.planner
    if section.actuator == "kubernetes":
        actuator = assembly.kubernetes_actuator(section, router=router)
    else:
        actuator = LocalActuator(launcher, router, tuple(section.devices), drain_timeout_s=section.drain_timeout_s)
    return await assembly.start_planner(section, router, actuator)
