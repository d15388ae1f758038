"""Mixed traffic for a soak run: what a server meets in a day, in a closed loop until a deadline.

`MixedTraffic(url, model, concurrency, seed)` owns its slots and its tallies. `run(duration_s)` keeps
`concurrency` slots busy; each slot draws its next piece of work by `WEIGHTS`:
- `chat`: a session of `CHAT_TURNS` streamed turns on /v1/chat/completions (each reply joins the
  history of the next turn);
- `short`: a non-streamed completion of a few tokens;
- `long`: a streamed completion of a long prompt and many tokens;
- `aborted`: a streamed chat the client closes after a few chunks (the server must free it);
- `bad`: one of `BAD_BODIES` (malformed JSON, out-of-range numbers, an unknown model, wrong types),
  each of which must get a 4xx.
`tallies` counts per kind: ok, rejected (429/503: load shedding), error (anything else) and 5xx
(a bad request answered 5xx is a server bug, whatever the load).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter

import aiohttp

from tidal.bench.client import REJECT_STATUSES, stream_request
from tidal.bench.metrics import RequestRecord

WEIGHTS = {"chat": 3, "short": 3, "long": 2, "aborted": 1, "bad": 1}
CHAT_TURNS = 3
ABORT_AFTER_CHUNKS = 3
BAD_BODIES: tuple[str, ...] = (
    "{not json",
    json.dumps({"model": "MODEL", "prompt": "hi", "max_tokens": -1}),
    json.dumps({"model": "no-such-model", "prompt": "hi", "max_tokens": 4}),
    json.dumps({"model": "MODEL", "prompt": "hi", "temperature": "hot"}),
    json.dumps({"model": "MODEL", "messages": "not a list"}),
    json.dumps({"model": "MODEL", "prompt": "hi", "max_tokens": 4, "top_p": 7}),
)
"""Bodies every server must refuse with a 4xx (MODEL stands for the served model's name)."""

_WORDS = ("tide", "harbour", "lantern", "river", "copper", "meadow", "signal", "orbit", "granite", "willow",
          "ember", "compass", "glacier", "quill", "saffron", "thunder")


class MixedTraffic:
    def __init__(self, url: str, model: str, concurrency: int = 4, seed: int = 0) -> None:
        self.url, self.model, self.concurrency = url, model, concurrency
        self.rng = random.Random(seed)
        self.tallies: dict[str, Counter] = {kind: Counter() for kind in WEIGHTS}
        self.start = 0.0

    async def run(self, duration_s: float) -> dict[str, dict[str, int]]:
        """Closed-loop traffic until `duration_s` has passed (the work under way then finishes)."""
        timeout = aiohttp.ClientTimeout(total=600.0, connect=30.0)
        connector = aiohttp.TCPConnector(limit=self.concurrency + 4)
        self.start = time.perf_counter()
        deadline = self.start + duration_s
        async with aiohttp.ClientSession(base_url=self.url, timeout=timeout, connector=connector) as client:
            async def slot() -> None:
                while time.perf_counter() < deadline:
                    kind = self.rng.choices(list(WEIGHTS), weights=list(WEIGHTS.values()))[0]
                    await getattr(self, f"_{kind}")(client)
            await asyncio.gather(*(slot() for _ in range(self.concurrency)))
        return {kind: dict(counts) for kind, counts in self.tallies.items()}

    def _words(self, n: int) -> str:
        return " ".join(self.rng.choice(_WORDS) for _ in range(n))

    def _count(self, kind: str, record: RequestRecord) -> None:
        self.tallies[kind][record.status] += 1
        if record.error and record.error.startswith("HTTP 5") and record.status != "rejected":
            self.tallies[kind]["5xx"] += 1

    async def _chat(self, client: aiohttp.ClientSession) -> None:
        messages = [{"role": "system", "content": "You answer briefly."}]
        for turn in range(CHAT_TURNS):
            messages.append({"role": "user", "content": f"Turn {turn}: tell me about {self._words(12)}."})
            record = RequestRecord(request_id="chat", sent_s=0.0, scheduled_s=0.0, input_tokens=0)
            body = {"model": self.model, "messages": messages, "max_tokens": 24, "temperature": 0.7}
            reply = await stream_request(client, "/v1/chat/completions", body, record, self.start)
            self._count("chat", record)
            if record.status != "ok":
                return
            messages.append({"role": "assistant", "content": reply})

    async def _short(self, client: aiohttp.ClientSession) -> None:
        body = {"model": self.model, "prompt": self._words(8), "max_tokens": 4}
        record = RequestRecord(request_id="short", sent_s=0.0, scheduled_s=0.0, input_tokens=0)
        try:
            async with client.post("/v1/completions", json=body) as response:
                raw = await response.read()
                if response.status != 200:
                    record.status = "rejected" if response.status in REJECT_STATUSES else "error"
                    record.error = f"HTTP {response.status}: {raw[:200]!r}"
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            record.status, record.error = "error", f"{type(exc).__name__}: {exc}"
        self._count("short", record)

    async def _long(self, client: aiohttp.ClientSession) -> None:
        body = {"model": self.model, "prompt": self._words(self.rng.randint(200, 500)), "max_tokens": 64,
                "ignore_eos": True}
        record = RequestRecord(request_id="long", sent_s=0.0, scheduled_s=0.0, input_tokens=0)
        await stream_request(client, "/v1/completions", body, record, self.start)
        self._count("long", record)

    async def _aborted(self, client: aiohttp.ClientSession) -> None:
        body = {"model": self.model, "messages": [{"role": "user", "content": self._words(40)}], "max_tokens": 200,
                "ignore_eos": True, "stream": True}
        record = RequestRecord(request_id="aborted", sent_s=0.0, scheduled_s=0.0, input_tokens=0)
        try:
            async with client.post("/v1/chat/completions", json=body) as response:
                if response.status != 200:
                    record.status = "rejected" if response.status in REJECT_STATUSES else "error"
                    record.error = f"HTTP {response.status}"
                else:
                    chunks = 0
                    async for line in response.content:
                        chunks += line.startswith(b"data: ")
                        if chunks >= ABORT_AFTER_CHUNKS:
                            break  # leaving the block closes the connection mid-stream
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            record.status, record.error = "error", f"{type(exc).__name__}: {exc}"
        self._count("aborted", record)

    async def _bad(self, client: aiohttp.ClientSession) -> None:
        raw = self.rng.choice(BAD_BODIES).replace("MODEL", self.model)
        path = "/v1/chat/completions" if "messages" in raw else "/v1/completions"
        record = RequestRecord(request_id="bad", sent_s=0.0, scheduled_s=0.0, input_tokens=0)
        try:
            async with client.post(path, data=raw, headers={"Content-Type": "application/json"}) as response:
                await response.read()
                if not 400 <= response.status < 500:  # the expected answer is a 4xx: that is "ok" here
                    record.status, record.error = "error", f"HTTP {response.status}"
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            record.status, record.error = "error", f"{type(exc).__name__}: {exc}"
        self._count("bad", record)
