"""The worker process: one engine, driven in a loop, reached over the ZMQ request plane.

Lifecycle: spawned by the launcher -> loads the engine -> sends `WorkerReady` -> loops
{drain incoming AddRequest/AbortRequest; run one engine step; send StepOutputs} -> exits on
`Shutdown`, or when its parent process is gone. The worker owns nothing outside its engine;
the requests it holds die with it, and the client side fails them.
"""

from __future__ import annotations

import logging
import os
import time

import msgspec
import torch
import zmq

from tidal.config import EngineConfig
from tidal.engine.engine import EngineCore
from tidal.protocol import (AbortRequest, AddRequest, RequestPlaneMessage, Shutdown, StepOutputs,
                            WorkerMessage, WorkerReady)

logger = logging.getLogger(__name__)

IDLE_POLL_MS = 50
STATS_INTERVAL_S = 0.5


def run_worker(config: EngineConfig, request_addr: str, output_addr: str, num_threads: int | None = None,
               log_level: str = "INFO") -> None:
    """Entry point of the worker process (multiprocessing target)."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s worker: %(message)s")
    if num_threads:
        torch.set_num_threads(num_threads)
    parent_pid = os.getppid()
    ctx = zmq.Context()
    requests = ctx.socket(zmq.PULL)
    requests.connect(request_addr)
    outputs = ctx.socket(zmq.PUSH)
    outputs.connect(output_addr)
    encoder = msgspec.msgpack.Encoder()
    decoder = msgspec.msgpack.Decoder(RequestPlaneMessage)
    try:
        engine = EngineCore(config)
        outputs.send(encoder.encode(_ready(engine)))
        _loop(engine, requests, outputs, encoder, decoder, parent_pid)
    finally:
        requests.close(linger=0)
        outputs.close(linger=1000)
        ctx.term()


def _ready(engine: EngineCore) -> WorkerMessage:
    return WorkerReady(model_name=engine.model_name, max_model_len=engine.max_model_len,
                       vocab_size=engine.vocab_size, kv_blocks_total=engine.kv.num_blocks,
                       block_size=engine.kv.block_size)


def _loop(engine: EngineCore, requests: zmq.Socket, outputs: zmq.Socket, encoder, decoder,
          parent_pid: int) -> None:
    last_stats = 0.0
    while True:
        timeout = 0 if engine.has_work() else IDLE_POLL_MS
        if requests.poll(timeout):
            while True:
                try:
                    raw = requests.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                msg = decoder.decode(raw)
                if isinstance(msg, AddRequest):
                    engine.add_request(msg)
                elif isinstance(msg, AbortRequest):
                    engine.abort_request(msg.request_id)
                elif isinstance(msg, Shutdown):
                    logger.info("shutdown requested")
                    return
        now = time.monotonic()
        if engine.has_work():
            deltas = engine.step()
            if deltas or now - last_stats > STATS_INTERVAL_S:
                outputs.send(encoder.encode(StepOutputs(deltas=deltas, stats=engine.stats())))
                last_stats = now
        elif now - last_stats > STATS_INTERVAL_S:
            outputs.send(encoder.encode(StepOutputs(deltas=[], stats=engine.stats())))
            last_stats = now
            if os.getppid() != parent_pid:
                logger.warning("parent process is gone; exiting")
                return
