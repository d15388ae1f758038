"""The worker process: one engine with a role, driven in a loop, reached over the request plane.

Sockets (all bound here; clients and peers connect):
- request plane: a ZMQ ROUTER at `spec.request_addr`. Clients (frontends) send `Connect`, then
  `AddRequest`/`AbortRequest`; each request's `StepOutputs` go back to the client that sent it.
  Prefill-side peers (decode workers) send `ReleaseKV` here too.
- event plane: a `ZmqEventPublisher` at `spec.event_addr`: load reports (topic `load`) and
  prefix-cache changes (topic `kv`, `KVEventBatch` with ids counting up per worker instance; a
  router that sees a gap sends `KVDumpRequest` and gets the whole cache as a `KVDump`).

Lifecycle: started by the launcher (or `tidal worker`) -> binds -> loads the engine -> answers
each `Connect` with `WorkerReady` -> loops {read messages; run one engine step; send outputs,
KV releases and load reports} -> (a planner may flip an idle worker's role with `SetRole`: the
engine, its weights and its caches stay; only the role it reports changes) -> exits.

Exits: SIGTERM leaves gracefully: the worker tells every client `WorkerLeaving` (routers send it
nothing new), finishes what it holds (requests, KV pulls, KV held for a decode worker) for up to
`spec.stop_grace_s`, sends `WorkerGone` and exits; a second SIGTERM cuts the grace short.
`Shutdown`, SIGUSR1 (the launcher stopping a whole deployment) or a vanished parent stop it after
the current step, also with a `WorkerGone`. SIGINT is ignored: Ctrl-C reaches the launcher, which
stops its workers in order. Requests a worker still held when it exits end on the client side,
where a router moves them to another worker (request migration).

With `spec.health_port`, a small HTTP server (`health.py`) answers /live and /health.

With `spec.curve` (cluster mode with `curve_key_dir`) the request socket and the ZMQ event
publisher are CURVE servers and the worker's context runs a ZAP handler (`tidal.curve`): a client
without the cluster's keys gets no connection, and the worker serves the others as before. The
worker's own ReleaseKV sockets to prefill peers dial with the same keys.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
import torch
import zmq

from tidal import curve
from tidal.config import STATS_LOG_INTERVAL_S, STOP_GRACE_S, EngineConfig, LogFormat
from tidal.curve import CurveKeys
from tidal.engine.engine import EngineCore
from tidal.engine.factory import build_engine
from tidal.protocol import (ROLES, AbortRequest, Role, AddRequest, Connect, EngineStats, KVDump, KVDumpRequest, KVEventBatch,
                            ForgetClient, LoadReport, ReleaseKV, RequestPlaneMessage, RoleRefused, SetDraining, SetRole,
                            Shutdown, StepOutputs,
                            TokenDelta, WorkerDraining, WorkerGone, WorkerLeaving, WorkerReady)
from tidal.logs import configure_logging
from tidal.runtime.events import EventPublisher, ZmqEventPublisher
from tidal.worker.health import HealthServer
from tidal.worker.stats_log import EngineStatsLog
from tidal.transfer import KVTransferConfig

logger = logging.getLogger(__name__)

IDLE_POLL_MS = 50
PULL_POLL_MS = 1  # while KV pulls are in flight and nothing else runs
STATS_INTERVAL_S = 0.5
EXIT_LINGER_MS = 500  # at exit, how long queued messages (last deltas, WorkerGone) may take to leave
GPU_WORKER_THREADS = 1
"""Torch CPU threads of a GPU worker. Its CPU tensor work is small (step inputs, sampling
bookkeeping); with a thread per core, OpenMP's spinning threads may burn several cores of the host
between GPU steps (issue 15 saw a worker at 4.7 cores under overload on a 16-core H100 host), cores
the API servers need. vLLM's GPU workers likewise run torch with one thread."""


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker process needs, passed to it at spawn."""

    worker_id: str
    role: Role
    engine: EngineConfig
    request_addr: str
    event_addr: str
    transfer: KVTransferConfig | None = None
    num_threads: int | None = None
    log_level: str = "INFO"
    log_format: LogFormat = "text"
    stats_log_interval_s: float = STATS_LOG_INTERVAL_S
    """Log a line of the engine's stats this often (when it ran or changed); 0: never."""
    stop_grace_s: float = STOP_GRACE_S
    """After SIGTERM: how long in-flight requests may take to finish before the worker exits."""
    health_port: int | None = None
    """Serve /live and /health on this port (0: any free one); None: no health endpoint."""
    health_host: str = "127.0.0.1"
    """Where the health endpoint binds (`tidal serve`: the API's host; cluster mode: the worker's own
    address)."""
    curve: CurveKeys | None = None
    """CURVE keys of the request plane and the ZMQ event plane; None: plain sockets."""
    advertise_addr: str | None = None
    """The request address peers dial (`tcp://HOST:PORT`), when `request_addr` binds a wildcard
    host; None: `request_addr` itself."""


class StopFlag:
    """Set `requested` to end a worker loop after its current step (SIGUSR1 does, in a process);
    `leave_requested` to leave gracefully (SIGTERM)."""

    requested = False
    leave_requested = False

    def on_sigterm(self, *_) -> None:
        """The first SIGTERM leaves gracefully; a second one stops now."""
        if self.leave_requested:
            self.requested = True
        self.leave_requested = True


def run_worker(spec: WorkerSpec) -> None:
    """Entry point of the worker process (multiprocessing target)."""
    configure_logging(spec.log_level, spec.log_format, f"worker {spec.worker_id}")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stop = StopFlag()
    signal.signal(signal.SIGTERM, stop.on_sigterm)
    signal.signal(signal.SIGUSR1, lambda *_: setattr(stop, "requested", True))
    if spec.num_threads:
        torch.set_num_threads(spec.num_threads)
    serve_engine(spec, lambda: build_engine(spec.engine, worker_id=spec.worker_id, transfer_config=spec.transfer,
                                            record_kv_events=True),
                 stop, os.getppid())
    # Everything is closed; skip the interpreter's teardown of the model and caches (it takes seconds
    # on a busy machine, and a leaving worker should be gone within its grace period).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def serve_engine(spec: WorkerSpec, make_engine: Callable[[], EngineCore], stop: StopFlag, parent_pid: int,
                 events: EventPublisher | None = None) -> None:
    """Bind the worker's sockets, build the engine, run the loop until `stop` (or Shutdown); close all.
    The worker process runs this; the simulator runs it on threads of one process. `parent_pid` 0:
    don't exit when the parent goes (`tidal worker`). `events`: the event publisher to use (closed
    here); None: a ZMQ PUB socket bound at `spec.event_addr`."""
    ctx = zmq.Context()
    auth = curve.Authenticator(ctx, spec.curve)  # before any server socket of ctx binds
    requests = ctx.socket(zmq.ROUTER)
    requests.setsockopt(zmq.LINGER, 0)
    curve.serve(spec.curve, requests)
    requests.bind(spec.request_addr)
    events = events if events is not None else ZmqEventPublisher(spec.event_addr, ctx, spec.curve)
    health = None
    engine = None
    try:
        if spec.health_port is not None:
            health = HealthServer(spec.health_host, spec.health_port, spec.worker_id)
            health.start()
        engine = make_engine()
        engine.connector.release_addr = spec.advertise_addr or spec.request_addr
        _WorkerLoop(spec, engine, requests, events, ctx, parent_pid, stop, health).run()
    finally:
        if engine is not None:
            engine.close()
        if health is not None:
            health.close()
        events.close()
        requests.close(linger=EXIT_LINGER_MS)
        auth.stop()
        ctx.term()


class _WorkerLoop:
    def __init__(self, spec: WorkerSpec, engine: EngineCore, requests: zmq.Socket,
                 events: ZmqEventPublisher, ctx: zmq.Context, parent_pid: int, stop: StopFlag,
                 health: HealthServer | None = None):
        self.spec = spec
        self.engine = engine
        self.requests = requests
        self.events = events
        self.ctx = ctx
        self.parent_pid = parent_pid
        self.stop = stop
        self.encoder = msgspec.msgpack.Encoder()
        self.decoder = msgspec.msgpack.Decoder(RequestPlaneMessage)
        self.clients: set[bytes] = set()
        self.owners: dict[str, bytes] = {}  # request_id -> the client that sent it
        self.peers: dict[str, zmq.Socket] = {}  # prefill workers this one releases KV to
        self.role = spec.role  # changes on SetRole
        self.ready = WorkerReady(worker_id=spec.worker_id, role=spec.role, model_name=engine.model_name,
                                 max_model_len=engine.max_model_len, vocab_size=engine.vocab_size,
                                 kv_blocks_total=engine.kv.num_blocks, block_size=engine.kv.block_size)
        self.health = health
        self.leave_deadline: float | None = None  # set when leaving (SIGTERM)
        self.last_stats = 0.0
        self.stats_log = EngineStatsLog(spec.stats_log_interval_s) if spec.stats_log_interval_s > 0 else None
        self.instance_id = uuid.uuid4().hex  # a restarted worker is a new instance: routers resync
        self.event_id = 0  # KV event batches published so far

    def run(self) -> None:
        engine = self.engine
        if self.health is not None:
            self.health.status = "ready"
        reason = "shutdown requested"
        try:
            while not self.stop.requested:
                if self.stop.leave_requested:
                    # Take what clients already sent before judging whether the worker holds nothing.
                    if self.requests.poll(0) and not self._read_requests():
                        return
                    if self._left():
                        reason = "left (SIGTERM)"
                        return
                if engine.has_work():
                    timeout = 0
                elif engine.has_pulls():
                    timeout = PULL_POLL_MS
                else:
                    timeout = IDLE_POLL_MS
                if self.requests.poll(timeout) and not self._read_requests():
                    reason = "shutdown requested"
                    return
                deltas = engine.step() if engine.has_work() or engine.has_pulls() else []
                self._publish_kv_events()
                self._send_releases()
                now = time.monotonic()
                stats_due = now - self.last_stats > STATS_INTERVAL_S
                # Every step's outputs carry a load snapshot (the frontend's gauges are one step old at
                # most); every STATS_INTERVAL_S it goes to every client and out as a load report.
                stats = engine.stats() if deltas or stats_due else None
                if stats is not None:
                    self._send_outputs(deltas, stats, to_all=stats_due)
                if stats_due:
                    self.last_stats = now
                    if self.stats_log is not None:
                        self.stats_log.observe(stats, now)
                    self.events.publish("load", LoadReport(worker_id=self.spec.worker_id, role=self.role,
                                                           stats=stats, time=time.time()))
                    if self.parent_pid and os.getppid() != self.parent_pid:
                        logger.warning("parent process is gone; exiting")
                        reason = "its parent process is gone"
                        return
            logger.info("shutdown requested (signal)")
        finally:
            self._to_clients(WorkerGone(worker_id=self.spec.worker_id, reason=reason))
            for sock in self.peers.values():
                sock.close(linger=100)

    def _left(self) -> bool:
        """Leaving (SIGTERM): on the first call tell every client; True once the worker holds
        nothing or its grace period is over (what is left then moves to other workers)."""
        now = time.monotonic()
        if self.leave_deadline is None:
            self.leave_deadline = now + self.spec.stop_grace_s
            logger.info("leaving (SIGTERM): finishing in-flight work for up to %.0fs", self.spec.stop_grace_s)
            if self.health is not None:
                self.health.status = "leaving"
            self._to_clients(WorkerLeaving(worker_id=self.spec.worker_id, grace_s=self.spec.stop_grace_s))
        busy = self.engine.idle_for_role_change()
        if busy is None:
            logger.info("drained; exiting")
            return True
        if now >= self.leave_deadline:
            logger.warning("grace period over with %s; exiting (clients move those requests)", busy)
            return True
        return False

    def _to_clients(self, msg, skip: bytes | None = None) -> None:
        raw = self.encoder.encode(msg)
        for client in list(self.clients):
            if client == skip:
                continue
            try:
                self.requests.send_multipart([client, raw], zmq.NOBLOCK)
            except zmq.ZMQError:
                self.clients.discard(client)

    def _read_requests(self) -> bool:
        """Handle every queued message; False when asked to shut down."""
        while True:
            try:
                identity, raw = self.requests.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return True
            msg = self.decoder.decode(raw)
            if isinstance(msg, AddRequest):
                self.owners[msg.request_id] = identity
                self.engine.add_request(msg)
            elif isinstance(msg, AbortRequest):
                self.engine.abort_request(msg.request_id)
            elif isinstance(msg, ReleaseKV):
                self.engine.connector.release(msg.request_id)
            elif isinstance(msg, KVDumpRequest):
                self._publish_kv_events()  # the dump is the state after every published batch
                dump = KVDump(worker_id=self.spec.worker_id, instance_id=self.instance_id, event_id=self.event_id,
                              blocks=self.engine.cached_blocks())
                self.requests.send_multipart([identity, self.encoder.encode(dump)])
            elif isinstance(msg, Connect):
                self.clients.add(identity)
                self.requests.send_multipart([identity, self.encoder.encode(self.ready)])
            elif isinstance(msg, SetRole):
                reply = self._set_role(msg.role)
                if isinstance(reply, WorkerReady):
                    self.engine.set_scheduler_limits(msg.token_budget, msg.max_num_seqs)
                    self._to_clients(reply, skip=identity)  # every router replica learns the new role
                self.requests.send_multipart([identity, self.encoder.encode(reply)])
            elif isinstance(msg, SetDraining):
                self.ready = msgspec.structs.replace(self.ready, draining=msg.draining)
                self._to_clients(WorkerDraining(worker_id=self.spec.worker_id, draining=msg.draining))
            elif isinstance(msg, ForgetClient):
                self._forget_client(msg.client_prefix.encode())
            elif isinstance(msg, Shutdown):
                logger.info("shutdown requested")
                return False

    def _forget_client(self, prefix: bytes) -> None:
        """A frontend process is gone: abort what its sockets sent (their deltas have no reader)."""
        gone = [request_id for request_id, owner in self.owners.items() if owner.startswith(prefix)]
        for request_id in gone:
            self.engine.abort_request(request_id)
            self.owners.pop(request_id, None)
        self.clients = {client for client in self.clients if not client.startswith(prefix)}
        if gone:
            logger.info("aborted %d requests of a frontend process that is gone", len(gone))

    def _set_role(self, role: Role) -> WorkerReady | RoleRefused:
        """Switch roles if nothing is in flight here (the router drains the worker first)."""
        busy = self.engine.idle_for_role_change()
        reason = f"unknown role {role!r}" if role not in ROLES else (f"still has {busy}" if busy else None)
        if reason is not None:
            logger.warning("refusing to become %s: %s", role, reason)
            return RoleRefused(worker_id=self.spec.worker_id, role=self.role, reason=reason)
        logger.info("role %s -> %s", self.role, role)
        self.role = role
        self.ready = msgspec.structs.replace(self.ready, role=role)
        self.last_stats = 0.0  # a load report with the new role goes out after this step
        return self.ready

    def _send_outputs(self, deltas: list[TokenDelta], stats: EngineStats, to_all: bool) -> None:
        """Each client's deltas with the load snapshot; `to_all`: a message to every client."""
        by_client: dict[bytes, list[TokenDelta]] = defaultdict(list)
        for delta in deltas:
            owner = self.owners.pop(delta.request_id, None) if delta.finished else self.owners.get(delta.request_id)
            if owner is not None:
                by_client[owner].append(delta)
        targets = self.clients | by_client.keys() if to_all else by_client.keys()
        for client in list(targets):
            msg = StepOutputs(deltas=by_client.get(client, []), stats=stats)
            try:
                self.requests.send_multipart([client, self.encoder.encode(msg)], zmq.NOBLOCK)
            except zmq.ZMQError:  # that client is gone (ROUTER drops or refuses unroutable peers)
                self.clients.discard(client)

    def _publish_kv_events(self) -> None:
        events = self.engine.take_kv_events()
        if events:
            self.event_id += 1
            self.events.publish("kv", KVEventBatch(worker_id=self.spec.worker_id, instance_id=self.instance_id,
                                                   event_id=self.event_id, events=events))

    def _send_releases(self) -> None:
        connector = self.engine.connector
        for addr, request_id in connector.take_releases():
            if addr == connector.release_addr:
                connector.release(request_id)
                continue
            sock = self.peers.get(addr)
            if sock is None:
                sock = self.peers[addr] = self.ctx.socket(zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 100)
                sock.setsockopt(zmq.SNDHWM, 100_000)
                curve.dial(self.spec.curve, sock)
                sock.connect(addr)
            try:
                sock.send(self.encoder.encode(ReleaseKV(request_id=request_id)), zmq.NOBLOCK)
            except zmq.Again:  # the peer is unreachable: its hold times out by itself
                logger.warning("could not send ReleaseKV(%s) to %s", request_id, addr)
