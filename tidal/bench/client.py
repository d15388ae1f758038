"""One streamed request against an OpenAI-compatible server, timed chunk by chunk (aiohttp: its
client keeps up with thousands of open streams where httpx fell behind, see
benchmarks/bench_client_capacity.py).

`stream_request` posts a body with `stream: true` (and `stream_options.include_usage`), reads the
server-sent events, and fills a `RequestRecord`: time to the first chunk that carries text, every
gap between such chunks, end to end, output tokens (the server's usage count when it gives one,
else the number of text chunks), and how it ended: `ok`, `rejected` (HTTP 429/503: the server
refused it for load) or `error` (any other status, a broken stream, an error event). It returns
the generated text too (a chat workload puts it in the next turn's history).

`closed_loop` sends a fixed list of bodies from `concurrency` slots, each slot starting its next
request when the last one ended (a CPU benchmark's levels: the same prompts for every server).
"""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp

from tidal.bench.metrics import RequestRecord

REJECT_STATUSES = (429, 503)


async def stream_request(client: aiohttp.ClientSession, path: str, body: dict, record: RequestRecord,
                         run_start: float) -> str:
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    record.sent_s = start - run_start
    text_parts: list[str] = []
    last = None
    chunks = 0
    try:
        async with client.post(path, json=body) as response:
            if response.status != 200:
                raw = (await response.read()).decode(errors="replace")
                record.status = "rejected" if response.status in REJECT_STATUSES else "error"
                record.error = f"HTTP {response.status}: {raw[:300]}"
                return ""
            async for raw_line in response.content:
                line = raw_line.decode().rstrip("\r\n")
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    record.status, record.error = "error", str(event["error"].get("message", event["error"]))
                    return "".join(text_parts)
                if event.get("usage"):
                    usage = event["usage"]
                    record.output_tokens = usage.get("completion_tokens", record.output_tokens)
                    record.input_tokens = usage.get("prompt_tokens", record.input_tokens)
                for choice in event.get("choices") or ():
                    piece = choice.get("text")
                    if piece is None:
                        piece = (choice.get("delta") or {}).get("content")
                    if not piece:
                        continue
                    now = time.perf_counter()
                    if last is None:
                        record.ttft_s = now - start
                    else:
                        record.itl_s.append(now - last)
                    last = now
                    chunks += 1
                    text_parts.append(piece)
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError) as exc:
        record.status, record.error = "error", f"{type(exc).__name__}: {exc}"
        return "".join(text_parts)
    record.e2e_s = time.perf_counter() - start
    if not record.output_tokens:
        record.output_tokens = chunks
    if record.ttft_s is None:
        record.status, record.error = "error", "the stream ended without any text"
    return "".join(text_parts)


async def closed_loop(url: str, path: str, bodies: list[dict], concurrency: int,
                      timeout_s: float = 600.0) -> tuple[list[RequestRecord], float]:
    """Every body streamed once, at most `concurrency` at a time, in order; (records, wall seconds)."""
    records = [RequestRecord(request_id=str(i), sent_s=0.0, scheduled_s=0.0, input_tokens=0)
               for i in range(len(bodies))]
    queue = iter(range(len(bodies)))
    connector = aiohttp.TCPConnector(limit=concurrency + 4)
    timeout = aiohttp.ClientTimeout(total=timeout_s, connect=30.0)
    async with aiohttp.ClientSession(base_url=url, timeout=timeout, connector=connector) as client:
        start = time.perf_counter()

        async def slot() -> None:
            for i in queue:
                await stream_request(client, path, bodies[i], records[i], start)
        await asyncio.gather(*(slot() for _ in range(concurrency)))
        wall_s = time.perf_counter() - start
    return records, wall_s
