"""The KV connector: an engine's disaggregation state, between its KV cache and the transfer backend.

`KVConnector` owns what a worker does for disaggregated serving, so the engine loop stays one
schedule -> run -> emit step:
- decode side, pulls: a request that arrives with `kv_transfer_params` waits (WAITING_FOR_KV in
  the scheduler) until the connector gives it blocks (locally cached prefix blocks are reused,
  only the rest is pulled), starts its pull, and polls it. `advance_pulls` hands back each pull
  that ended (`PulledKV`): the engine then runs the request, or ends it with the error. Pulls
  start in arrival order; one that finds no room holds back the later ones.
- prefill side, holds: a finished remote prefill (`hold_kv`) keeps its blocks in the KV cache
  manager; `held_params` tells the decode worker where they are and starts the hold's deadline
  (twice the transfer timeout). `release` (the decode worker's `ReleaseKV`, or an abort) or the
  deadline (`expire_holds`) frees them.
- releases: every pull that ends, or a pulling request that is refused or aborted, queues a
  release for its prefill worker; the worker process sends them (`take_releases`).
- counters: transfers, failures, bytes and seconds, for load reports (`stats_fields`).

Invariant: no block is freed while a copy may still write into it. An abort during a pull is
deferred (`PulledKV.aborted`) until the pull ends.

An engine without a transfer backend (`backend` None) has a connector too: it refuses remote
prefills and pulls (`check`) and holds nothing.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

from tidal.engine.kv_cache.manager import KVCacheManager
from tidal.engine.request import Request
from tidal.protocol import AddRequest, KVTransferParams
from tidal.transfer import KVTransferBackend, KVTransferError, Transfer

logger = logging.getLogger(__name__)


@dataclass
class _Pull:
    """A decode-side request waiting for its prompt's KV."""

    request: Request
    params: KVTransferParams
    transfer: Transfer | None = None  # None until blocks are allocated and the pull started
    abort_pending: bool = False


@dataclass
class PulledKV:
    """A pull that ended: the request's KV is in place (no error, not aborted), or it ends."""

    request: Request
    error: str | None = None
    """The transfer failed: the request ends with this error (its blocks hold nothing usable)."""
    aborted: bool = False
    """The request was aborted while its KV was being copied: it ends as aborted."""


class KVConnector:
    def __init__(self, kv: KVCacheManager, backend: KVTransferBackend | None = None) -> None:
        self.kv = kv
        self.backend = backend
        self.hold_s = 2 * backend.config.timeout_s if backend is not None else 0.0
        self.release_addr = ""  # this worker's request endpoint, set by the worker process
        self.pulls: dict[str, _Pull] = {}  # decode side, in arrival order
        self.held_until: dict[str, float] = {}  # prefill side: request_id -> hold deadline
        self._releases: deque[tuple[str, str]] = deque()  # (prefill worker endpoint, request_id)
        self.prefix_hit_tokens_total = 0  # of pulled requests: blocks cached here, not copied
        self.transfers_total = 0
        self.transfer_failures_total = 0
        self.transfer_bytes_total = 0
        self.transfer_seconds_total = 0.0

    def check(self, add: AddRequest) -> str | None:
        """Why this worker can't take `add`'s remote prefill or pull; None when it can."""
        if add.hold_kv and self.backend is None:
            return "this worker has no KV transfer backend, so it cannot serve remote prefills"
        params = add.kv_transfer_params
        if params is None:
            return None
        if self.backend is None:
            return "this worker has no KV transfer backend, so it cannot pull KV"
        if not add.output_token_ids:
            return "a request with pulled KV must carry the prefill worker's first token"
        n = len(add.prompt_token_ids)
        if params.num_tokens != n or len(params.block_ids) < -(-n // self.kv.block_size):
            return "kv_transfer_params do not cover the prompt"
        return None

    # ---- decode side: pulls -------------------------------------------------------------------
    def add_pull(self, request: Request, params: KVTransferParams) -> None:
        """Pull `request`'s prompt KV as soon as it gets blocks (the scheduler knows it as WAITING_FOR_KV)."""
        self.pulls[request.request_id] = _Pull(request, params)

    def refuse_pull(self, request_id: str, params: KVTransferParams) -> None:
        """A pulling request the engine refused: its prefill worker may free the blocks at once."""
        self._releases.append((params.release_addr, request_id))

    def has_pulls(self) -> bool:
        """KV pulls are waiting or in flight: poll soon, but there may be nothing to compute."""
        return bool(self.pulls)

    def has_unstarted_pulls(self) -> bool:
        """A pull waits for blocks: the next step may start it."""
        return any(pull.transfer is None for pull in self.pulls.values())

    def advance_pulls(self) -> list[PulledKV]:
        """Start pulls that can get blocks (in arrival order); return those that ended."""
        ended = []
        for request_id, pull in list(self.pulls.items()):
            if pull.transfer is None:
                if not self._start_pull(pull):
                    break  # no room yet; later arrivals wait behind it
            elif pull.transfer.done():
                del self.pulls[request_id]
                ended.append(self._end_pull(pull))
        return ended

    def abort(self, request_id: str) -> bool:
        """An abort of a held prefill or a pulling request. True: handled here (held blocks freed,
        or the abort deferred until the copy ends); False: the scheduler ends the request now."""
        if self.release(request_id):  # a held remote prefill whose decode will never come
            return True
        pull = self.pulls.get(request_id)
        if pull is None:
            return False
        if pull.transfer is not None:
            pull.abort_pending = True  # a copy may still write into its blocks: end it after
            return True
        del self.pulls[request_id]
        self._releases.append((pull.params.release_addr, request_id))
        return False

    def _start_pull(self, pull: _Pull) -> bool:
        request, bs = pull.request, self.kv.block_size
        n = request.num_prompt_tokens
        hits = self.kv.find_cached_prefix(request)
        if not self.kv.allocate_slots(request, n - len(hits) * bs, hits, defer_caching=True):
            return False
        request.num_cached_tokens = len(hits) * bs
        self.prefix_hit_tokens_total += len(hits) * bs
        table = self.kv.block_ids(request.request_id)
        num_blocks = -(-n // bs)
        src, dst = pull.params.block_ids[len(hits):num_blocks], table[len(hits):num_blocks]
        if not src:  # every full block was cached here already
            pull.transfer = _ImmediateTransfer()
            return True
        try:
            pull.transfer = self.backend.start_pull(pull.params.source, src, dst)
        except KVTransferError as exc:
            pull.transfer = _ImmediateTransfer(str(exc))
        return True

    def _end_pull(self, pull: _Pull) -> PulledKV:
        request, transfer = pull.request, pull.transfer
        self._releases.append((pull.params.release_addr, request.request_id))
        self.transfers_total += 1
        try:
            transfer.result()
        except KVTransferError as exc:
            self.transfer_failures_total += 1
            logger.warning("KV pull for %s failed: %s", request.request_id, exc)
            return PulledKV(request, error=str(exc))
        self.transfer_bytes_total += transfer.num_bytes
        self.transfer_seconds_total += transfer.seconds
        request.kv_transfer_s = transfer.seconds
        if pull.abort_pending:
            return PulledKV(request, aborted=True)
        request.num_computed_tokens = request.num_prompt_tokens
        self.kv.cache_blocks(request, request.num_prompt_tokens)
        return PulledKV(request)

    # ---- prefill side: holds ------------------------------------------------------------------
    def held_params(self, request: Request) -> KVTransferParams | None:
        """Where a finished remote prefill's held blocks are (its hold's deadline starts now);
        None when it holds none (it stopped before its length, or was aborted)."""
        held = self.kv.held.get(request.request_id)
        if held is None:
            return None
        self.held_until[request.request_id] = time.monotonic() + self.hold_s
        return KVTransferParams(source=self.backend.source_info(), block_ids=[b.block_id for b in held],
                                num_tokens=request.num_prompt_tokens, release_addr=self.release_addr)

    def release(self, request_id: str) -> bool:
        """The decode worker is done pulling this request's KV (or gave up): free it. False if
        nothing was held under that id."""
        if not self.kv.release(request_id):
            return False
        self.held_until.pop(request_id, None)
        return True

    def expire_holds(self) -> None:
        """Free the holds whose decode worker did not pull in time."""
        if not self.held_until:
            return
        now = time.monotonic()
        for request_id, deadline in list(self.held_until.items()):
            if now > deadline:
                logger.warning("no decode worker pulled %s in time; freeing its KV", request_id)
                self.release(request_id)

    # ---- the worker's part ----------------------------------------------------------------------
    def take_releases(self) -> list[tuple[str, str]]:
        """(prefill worker endpoint, request_id) of each `ReleaseKV` to send, oldest first."""
        releases = list(self._releases)
        self._releases.clear()
        return releases

    def stats_fields(self) -> dict:
        """This connector's part of `EngineStats`."""
        return dict(num_waiting_for_kv=len(self.pulls), num_held_kv=len(self.kv.held),
                    kv_transfers=self.transfers_total, kv_transfer_failures=self.transfer_failures_total,
                    kv_transfer_bytes=self.transfer_bytes_total, kv_transfer_seconds=self.transfer_seconds_total)

    def busy(self) -> dict[str, int]:
        """What the connector holds, by kind (a worker that holds anything can't change roles)."""
        return {"KV pulls in flight": len(self.pulls), "finished prefills holding KV": len(self.kv.held)}

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()


class _ImmediateTransfer(Transfer):
    """A pull with nothing to copy (error None), or one that could not start (bad source)."""

    def __init__(self, error: str | None = None) -> None:
        super().__init__(0)
        self.error = error
        self.finished = self.started

    def done(self) -> bool:
        return True

    def result(self) -> None:
        if self.error is not None:
            raise KVTransferError(self.error)
