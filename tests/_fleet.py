"""A deployment of real CPU worker processes (dummy:tiny-llama) driven from the test's event loop:
launcher + router + local actuator, requests sent straight to the router as token ids."""

from __future__ import annotations

import asyncio
import random
import time

from tidal.deploy.config import parse_deployment
from tidal.deploy.launcher import Launcher
from tidal.planner.actuators import LocalActuator
from tidal.protocol import AddRequest, SamplingParams
from tidal.router.service import Router

LONG_PROMPT_TOKENS = 160  # above the remote-prefill threshold below
SHORT_PROMPT_TOKENS = 12


def deployment(prefill: int, decode: int):
    return parse_deployment({
        "model": "dummy:tiny-llama",
        "engine": {"dtype": "float32", "num_kv_blocks": 512, "token_budget": 256, "seed": 1},
        "disaggregation": {"local_prefill_threshold": 64},
        "workers": [{"role": role, "count": n, "num_threads": 1}
                    for role, n in (("prefill", prefill), ("decode", decode)) if n],
    })


class Fleet:
    def __init__(self, deployment):
        self.launcher = Launcher(deployment, log_level="WARNING")
        self.router = Router(self.launcher.discovery, deployment.router_config())
        self.actuator = LocalActuator(self.launcher, self.router, drain_timeout_s=60)
        self.rng = random.Random(0)
        self.count = 0

    async def __aenter__(self):
        await self.launcher.start()
        await self.router.start()
        await self.router.wait_ready(timeout_s=120)
        return self

    async def __aexit__(self, *exc):
        processes = [p.process for p in self.launcher.procs.values()]
        await self.router.close()
        await self.launcher.stop()
        assert not any(p.is_alive() for p in processes)

    async def request(self, long: bool, max_tokens: int = 64) -> tuple[str, list[str]]:
        """One streamed request; returns (finish reason, the workers whose deltas it saw)."""
        self.count += 1
        n = LONG_PROMPT_TOKENS if long else SHORT_PROMPT_TOKENS
        add = AddRequest(request_id=f"r{self.count}", prompt_token_ids=[self.rng.randrange(100, 40000) for _ in range(n)],
                         sampling_params=SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
        tokens, last = 0, None
        async for delta in self.router.generate(add):
            assert delta.error is None, delta.error
            tokens += len(delta.new_token_ids)
            last = delta
        assert last.finished and tokens == max_tokens, (last, tokens)
        return last.finish_reason

    def load(self, n: int, **kw) -> list[asyncio.Task]:
        return [asyncio.create_task(self.request(long=i % 2 == 0, **kw)) for i in range(n)]

    async def feed(self, tasks: list[asyncio.Task], stop: asyncio.Event, every_s: float = 0.03) -> None:
        """A request (long and short in turn) every `every_s` until `stop`."""
        while not stop.is_set():
            tasks.append(asyncio.create_task(self.request(long=len(tasks) % 2 == 0)))
            await asyncio.sleep(every_s)

    def busy_elsewhere(self, worker_id: str) -> bool:
        return any(w.inflight for w_id, w in self.router.workers.items() if w_id != worker_id)

    async def wait_all_free(self, timeout_s: float = 15.0) -> None:
        """Until every worker's latest load report shows nothing used, held, pulled or running."""
        deadline = time.monotonic() + timeout_s
        while True:
            stats = {w: c.client.stats() for w, c in self.router.workers.items()}
            busy = {w: s for w, s in stats.items() if s is None or s.kv_blocks_used or s.num_held_kv
                    or s.num_waiting_for_kv or s.num_running or s.num_waiting}
            if not busy:
                return
            assert time.monotonic() < deadline, f"still in use: {busy}"
            await asyncio.sleep(0.1)


