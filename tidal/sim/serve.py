"""`tidal sim`: the real frontend and router in front of N simulated workers, on one machine.

Serves the OpenAI API on HOST:PORT with the embedded model's tokenizer (prompts and chat templates
are real; the workers only keep time), so `tidal bench` (or any client) can drive it. Stops on
Ctrl-C/SIGTERM.
"""

from __future__ import annotations

import logging

from tidal.config import ServerConfig
from tidal.router.service import Router, RouterConfig
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
                    server_config: ServerConfig, **cluster_options) -> None:
    from tidal.frontend.app import build_app, serve_http
    from tidal.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(None)
    cluster = SimCluster(num_workers, timing, speedup, vocab_size=tokenizer.vocab_size, **cluster_options)
    router = Router(cluster.discovery, router_config)
    try:
        await cluster.start()
        await router.start()
        await router.wait_ready()
        logger.info("simulating %d workers (speed-up %gx, %s) behind the %s router on http://%s:%d", num_workers,
                    speedup, timing, router_config.policy, server_config.host, server_config.port)
        await serve_http(build_app(router, tokenizer, SIM_MODEL_NAME, server_config), server_config)
    finally:
        await router.close()
        await cluster.stop_all()
