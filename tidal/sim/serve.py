"""`tidal sim`: the real frontend and router in front of N simulated workers, on one machine.

Serves the OpenAI API on HOST:PORT with the embedded model's tokenizer (prompts and chat templates
are real; the workers only keep time), so `tidal bench` (or any client) can drive it. Stops on
Ctrl-C/SIGTERM.
"""

from __future__ import annotations

import logging

from tidal.config import ServerConfig
from tidal.router.config import RouterConfig
from tidal.sim.timing import StepTimeModel, TimingModel
from tidal.sim.workers import SIM_MODEL_NAME, SimCluster

logger = logging.getLogger(__name__)


def parse_timing(text: str | None) -> TimingModel:
    """`base_s=0.01,prefill_s_per_token=0.00005,...` over the defaults."""
    values = {}
    fields = TimingModel.__dataclass_fields__
    for part in filter(None, (text or "").split(",")):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in fields:
            raise ValueError(f"bad timing term {part!r}; known: {', '.join(fields)}")
        values[key.strip()] = float(value)
    return TimingModel(**values)


async def serve_sim(num_workers: int, timing: StepTimeModel, speedup: float, router_config: RouterConfig,
                    server_config: ServerConfig, api_servers: int = 1, tokenizer: str | None = None,
                    **cluster_options) -> None:
    """The simulated workers behind the real serving tier: one frontend in this process, or
    `api_servers` API server processes on the one port (as `tidal serve` runs them)."""
    from tidal.frontend.assembly import Frontend, FrontendSpec
    from tidal.tokenizer import load_tokenizer

    spec = FrontendSpec(model=None, tokenizer=tokenizer, served_model_name=SIM_MODEL_NAME, router=router_config,
                        server=server_config)
    loaded = load_tokenizer(None, tokenizer)
    cluster = SimCluster(num_workers, timing, speedup, vocab_size=loaded.vocab_size, **cluster_options)
    frontend = Frontend(spec, cluster.discovery, tokenizer=loaded) if api_servers == 1 else None
    try:
        await cluster.start()
        logger.info("simulating %d workers (speed-up %gx, %s) behind the %s router on http://%s:%d, %d API server%s",
                    num_workers, speedup, timing, router_config.policy, server_config.host, server_config.port,
                    api_servers, "s" * (api_servers > 1))
        if frontend is not None:
            await frontend.start()
            await frontend.serve()
        else:
            await _serve_pool(spec, cluster, api_servers)
    finally:
        if frontend is not None:
            await frontend.close()
        await cluster.stop_all()


async def _serve_pool(spec, cluster: SimCluster, api_servers: int) -> None:
    from tidal.deploy.api_servers import ApiServerPool

    pool = ApiServerPool(spec, api_servers, cluster.discovery, log_level=spec.server.log_level)
    stop = pool.stop_on_signals()
    try:
        await pool.start()
        await stop.wait()
    finally:
        await pool.stop()
