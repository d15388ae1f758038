"""How much load can `tidal bench`'s client generate from one process?

A minimal HTTP endpoint in a child process (raw asyncio, no framework) answers every POST with a
server-sent-event stream of `--chunks` chunks spread over `--stream-s` seconds, so every request
stays open that long; this process runs `tidal.bench.runner.Bench` (synthetic workload, constant
arrivals) against it at `--rate` requests/s. Open streams = rate x stream_s. Reports the achieved
rate, the worst lateness against the schedule (the client's own delay), and errors.

    python -m benchmarks.bench_client_capacity --rate 500 --requests 5000 --stream-s 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import time

from tidal.bench.runner import Bench, BenchConfig
from tidal.runtime.ports import free_port

MODELS = json.dumps({"object": "list", "data": [{"id": "stub", "object": "model"}]}).encode()


def _serve(port: int, chunks: int, stream_s: float) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                if length:
                    await reader.readexactly(length)
                if head.startswith(b"GET"):
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                                 + str(len(MODELS)).encode() + b"\r\n\r\n" + MODELS)
                    await writer.drain()
                    continue
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                             b"transfer-encoding: chunked\r\n\r\n")
                for i in range(chunks):
                    await asyncio.sleep(stream_s / chunks)
                    data = b'data: {"choices":[{"index":0,"text":"x"}]}\n\n'
                    writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                usage = b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":' + \
                    str(chunks).encode() + b'}}\n\ndata: [DONE]\n\n'
                writer.write(f"{len(usage):x}\r\n".encode() + usage + b"\r\n0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=8192)
        async with server:
            await server.serve_forever()

    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=float, default=500.0)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--stream-s", type=float, default=10.0)
    parser.add_argument("--chunks", type=int, default=10)
    args = parser.parse_args()
    port = free_port()
    server = multiprocessing.get_context("spawn").Process(target=_serve, args=(port, args.chunks, args.stream_s),
                                                          daemon=True)
    server.start()
    time.sleep(1.0)
    try:
        config = BenchConfig(url=f"http://127.0.0.1:{port}", workload="synthetic", arrival="constant",
                             rate=args.rate, requests=args.requests, input_len=8, output_len=args.chunks,
                             vocab_size=100)
        summary = asyncio.run(Bench(config).run())
    finally:
        server.kill()
    print(f"offered {args.rate:g} req/s x {args.stream_s:g} s streams = {args.rate * args.stream_s:.0f} open streams;"
          f" sent at {summary['send_rate']:.1f} req/s; ok {summary['ok']}, errors {summary['errors']}; send lateness "
          f"p99 {summary['schedule_lag_p99_ms']:.0f} ms, worst {summary['max_schedule_lag_ms']:.0f} ms; "
          f"TTFT p50 {summary['ttft_ms']['p50']:.0f} ms (the stub's first chunk is due at "
          f"{args.stream_s / args.chunks * 1e3:.0f} ms)")


if __name__ == "__main__":
    main()
