"""ZMQ KV transfer between CPU workers, on one host or across hosts.

Each backend owns a plain in-memory cache, a ZMQ context and two threads:

- the KV server (`kv-server-<worker_id>`) binds a ROUTER at `config.zmq_address` (by default
  `tcp://127.0.0.1:*`, a free port; the bound endpoint, read back from the socket, is what
  `source_info()` advertises, with a wildcard host replaced by this host's name). It answers a
  `KVReadRequest` with one `KVReadReply` header frame and one raw frame per layer: the requested
  blocks of that layer, [2, num_kv_heads, n, block_size, head_dim] in the cache's dtype, gathered
  with `index_select` and sent without a copy.
- the pull thread (`kv-zmq-<worker_id>`, a one-thread executor) owns one DEALER socket per source
  worker. It sends the request, waits for the reply until the pull's deadline, and receives each
  layer's frame straight into a staging tensor (`recv_into`) that `index_copy_` scatters into
  our cache. Pulls run one after another.

A source that died, hangs or is unreachable shows as no reply: the pull fails at `timeout_s` and
its DEALER is closed (linger 0), so a late reply can't reach a later pull. Only msgspec structs
and raw tensor bytes cross the wire. `close()` stops both threads (they poll in short ticks and
watch a stop flag), closes every socket and terminates the context.

With `config.zmq_curve` the KV server is a CURVE server whose context runs a ZAP handler
(`tidal.curve.Authenticator`): a puller without the cluster's keys gets no reply (its pull times
out); the server keeps serving the others. Pulls dial with the same keys.
"""

from __future__ import annotations

import itertools
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import msgspec
import torch
import zmq

from tidal import curve
from tidal.protocol import KVLayout, KVSourceInfo
from tidal.transfer.base import (KVTransferBackend, KVTransferConfig, KVTransferError, ThreadTransfer,
                                 as_words, block_rows, layout_bytes_per_block, torch_dtype)

_POLL_TICK_MS = 50  # how long a thread may go without looking at the stop flag


class KVReadRequest(msgspec.Struct, frozen=True):
    transfer_id: int
    worker_id: str  # the source the puller means to read (a restarted endpoint may be someone else)
    block_ids: list[int]


class KVReadReply(msgspec.Struct, frozen=True):
    """Header frame; when `error` is empty, one frame per layer follows."""

    transfer_id: int
    error: str = ""


_request_decoder = msgspec.msgpack.Decoder(KVReadRequest)
_reply_decoder = msgspec.msgpack.Decoder(KVReadReply)


def _header(transfer_id: int, error: str = "") -> bytes:
    return msgspec.msgpack.encode(KVReadReply(transfer_id=transfer_id, error=error))


def _advertised(endpoint: str, host: str | None = None) -> str:
    """A wildcard bind can't be dialled: name this host instead (`host`, when given, for any tcp bind)."""
    if host is not None and endpoint.startswith("tcp://"):
        host = f"[{host}]" if ":" in host else host
        return f"tcp://{host}:{endpoint.rsplit(':', 1)[1]}"
    for wildcard in ("tcp://0.0.0.0:", "tcp://[::]:"):
        if endpoint.startswith(wildcard):
            return f"tcp://{socket.gethostname()}:{endpoint.removeprefix(wildcard)}"
    return endpoint


class ZmqKVTransfer(KVTransferBackend):
    name = "zmq"

    def __init__(self, layout: KVLayout, device: torch.device, worker_id: str,
                 config: KVTransferConfig) -> None:
        if torch.device(device).type != "cpu":
            raise ValueError(f"the zmq KV transfer backend serves CPU caches, not {device}")
        super().__init__(layout, device, worker_id, config)
        self._context = zmq.Context()
        self._closing = threading.Event()
        self._transfer_ids = itertools.count()
        self._dealers: dict[tuple[str, str], zmq.Socket] = {}  # pull thread only
        self._auth = curve.Authenticator(self._context, config.zmq_curve)
        router = self._context.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        curve.serve(config.zmq_curve, router)
        try:
            router.bind(config.zmq_address or "tcp://127.0.0.1:*")
        except zmq.ZMQError:
            router.close()
            self._auth.stop()
            self._context.term()
            raise
        self.endpoint = _advertised(router.getsockopt_string(zmq.LAST_ENDPOINT), config.zmq_advertise_host)
        # The router moves to the server thread here and is only touched there from now on.
        self._server = threading.Thread(target=self._serve, args=(router,), name=f"kv-server-{worker_id}",
                                        daemon=True)
        self._server.start()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"kv-zmq-{worker_id}")

    def _allocate(self) -> torch.Tensor:
        return torch.zeros(self.layout.shape, dtype=torch_dtype(self.layout.dtype))

    def source_info(self) -> KVSourceInfo:
        return KVSourceInfo(backend=self.name, worker_id=self.worker_id, pid=os.getpid(), layout=self.layout,
                            address=self.endpoint)

    # ---- server side ----------------------------------------------------------------------
    def _serve(self, router: zmq.Socket) -> None:
        try:
            while not self._closing.is_set():
                if router.poll(_POLL_TICK_MS):
                    identity, *_, payload = router.recv_multipart()
                    router.send_multipart([identity, *self._answer(payload)], copy=False)
        finally:
            router.close(linger=0)

    def _answer(self, payload: bytes) -> list:
        try:
            request = _request_decoder.decode(payload)
        except msgspec.DecodeError as exc:
            return [_header(-1, f"bad request: {exc}")]
        blocks = request.block_ids
        if request.worker_id != self.worker_id:
            return [_header(request.transfer_id, f"this is worker {self.worker_id}, not {request.worker_id}")]
        if blocks and (min(blocks) < 0 or max(blocks) >= self.layout.num_blocks):
            return [_header(request.transfer_id, "block id out of range")]
        idx = torch.tensor(blocks, dtype=torch.long)
        try:
            # One frame per layer: [2H, n, bs*D] gathered, as bytes; numpy keeps each tensor alive
            # until ZMQ has sent it.
            layers = [as_words(block_rows(layer)).index_select(1, idx).view(torch.uint8).numpy()
                      for layer in self.cache]
        except RuntimeError as exc:  # out of memory, say: refuse this pull, keep serving
            return [_header(request.transfer_id, f"gather failed: {exc}")]
        return [_header(request.transfer_id), *layers]

    # ---- pull side --------------------------------------------------------------------------
    def start_pull(self, source: KVSourceInfo, src_block_ids: list[int],
                   dst_block_ids: list[int]) -> ThreadTransfer:
        self.check_source(source, src_block_ids, dst_block_ids)
        if self._closing.is_set():
            raise KVTransferError("the KV transfer backend is closed")
        transfer = ThreadTransfer(len(src_block_ids) * layout_bytes_per_block(self.layout), source,
                                  self.config.timeout_s)
        job = partial(self._pull, transfer, list(src_block_ids), list(dst_block_ids))
        self._executor.submit(transfer.run, job)
        return transfer

    def _pull(self, transfer: ThreadTransfer, src_block_ids: list[int], dst_block_ids: list[int]) -> None:
        """Runs on the pull thread."""
        if self._closing.wait(self.config.debug_delay_s):
            raise KVTransferError("the KV transfer backend closed during the pull")
        source = transfer.source
        key = (source.worker_id, source.address)
        dealer = self._dealer(key)
        transfer_id = next(self._transfer_ids)
        request = KVReadRequest(transfer_id=transfer_id, worker_id=source.worker_id, block_ids=src_block_ids)
        try:
            dealer.send(msgspec.msgpack.encode(request), zmq.NOBLOCK)
            reply = self._await_reply(dealer, transfer_id, transfer.deadline)
            if reply is None:
                raise KVTransferError(f"source worker {source.worker_id} at {source.address} sent no KV "
                                      f"within {transfer.timeout_s:g} s")
            if reply.error:
                raise KVTransferError(f"source worker {source.worker_id} refused the pull: {reply.error}")
            if not transfer.claim():  # the deadline passed first; done() has reported it
                raise KVTransferError(f"the reply of {source.worker_id} came too late")
            self._receive_blocks(dealer, dst_block_ids)
        except Exception:
            self._drop_dealer(key)  # it may still hold (parts of) a reply
            raise

    def _await_reply(self, dealer: zmq.Socket, transfer_id: int, deadline: float) -> KVReadReply | None:
        """The header of the reply to `transfer_id`, or None once the deadline has passed."""
        while (remaining_ms := (deadline - time.monotonic()) * 1000) > 0:
            if self._closing.is_set():
                raise KVTransferError("the KV transfer backend closed during the pull")
            if not dealer.poll(min(_POLL_TICK_MS, remaining_ms)):
                continue
            reply = _reply_decoder.decode(dealer.recv())
            if reply.transfer_id == transfer_id:
                return reply
            while dealer.getsockopt(zmq.RCVMORE):  # a stale reply: skip its layer frames
                dealer.recv()
        return None

    def _receive_blocks(self, dealer: zmq.Socket, dst_block_ids: list[int]) -> None:
        """Receives the layer frames that follow the header into our cache."""
        layout = self.layout
        shape = (2 * layout.num_kv_heads, len(dst_block_ids), layout.block_size * layout.head_dim)
        staging = as_words(torch.empty(shape, dtype=self.cache.dtype))  # [2H, n, bs*D], one layer
        buffer = staging.view(torch.uint8).numpy()
        dst_idx = torch.tensor(dst_block_ids, dtype=torch.long)
        for layer in self.cache:
            if not dealer.getsockopt(zmq.RCVMORE):
                raise KVTransferError("the source's reply ended early")
            if dealer.recv_into(buffer) != buffer.nbytes:
                raise KVTransferError("a layer frame of the source's reply has the wrong size")
            as_words(block_rows(layer)).index_copy_(1, dst_idx, staging)
        if dealer.getsockopt(zmq.RCVMORE):
            raise KVTransferError("the source's reply has more layers than this cache")

    def _dealer(self, key: tuple[str, str]) -> zmq.Socket:
        if key not in self._dealers:
            dealer = self._context.socket(zmq.DEALER)
            dealer.setsockopt(zmq.LINGER, 0)
            curve.dial(self.config.zmq_curve, dealer)
            dealer.connect(key[1])
            self._dealers[key] = dealer
        return self._dealers[key]

    def _drop_dealer(self, key: tuple[str, str]) -> None:
        dealer = self._dealers.pop(key, None)
        if dealer is not None:
            dealer.close(linger=0)

    def forget_source(self, worker_id: str) -> None:
        if not self._closing.is_set():
            self._executor.submit(self._drop_dealers, worker_id)

    def _drop_dealers(self, worker_id: str | None = None) -> None:
        for key in [key for key in self._dealers if worker_id is None or key[0] == worker_id]:
            self._drop_dealer(key)

    def close(self) -> None:
        if self._closing.is_set():
            return
        self._closing.set()
        self._server.join()
        self._executor.submit(self._drop_dealers)
        self._executor.shutdown(wait=True)
        self._auth.stop()
        self._context.term()
