"""Remote prefill: a request prefilled on a prefill worker and decoded on another.

The prefill worker runs the request with max_tokens=1 and `hold_kv`; its first token streams to
the client at once; the decode worker gets the request with the prefill's `KVTransferParams`,
pulls the KV, releases the prefill worker's blocks and streams the rest. A prefill worker that dies
before its token makes the request fall back to a local prefill on the decode worker. Blocks held
on a prefill worker are released on every path that does not hand them to a decode worker (stop at
the first token, client gone, decode worker gone). A decode worker that cannot pull the KV (its
source died) or dies itself raises `WorkerLost`: the dispatcher moves the request.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable

import msgspec

from tidal.errors import EngineDeadError
from tidal.protocol import KV_TRANSFER_FAILED, AddRequest, TokenDelta
from tidal.router.metrics import RouterMetrics
from tidal.router.migration import WorkerLost
from tidal.router.plan import Plan
from tidal.router.workers import Worker

logger = logging.getLogger(__name__)


def lost_worker(worker: Worker, exc: EngineDeadError) -> WorkerLost:
    """The `WorkerLost` for a worker whose stream ended with `exc`: it left (SIGTERM) or died."""
    return WorkerLost("worker_left" if worker.client.leaving else "worker_died", str(exc), worker.worker_id)


class RemotePrefill:
    def __init__(self, metrics: RouterMetrics) -> None:
        self.metrics = metrics

    async def stream(self, prefill: Worker, decode: Worker, request: AddRequest, plan: Plan,
                     local: Callable[[Worker, AddRequest], AsyncIterator[TokenDelta]]) -> AsyncIterator[TokenDelta]:
        """The request's deltas: the prefill worker's first token, then the decode worker's; `local`
        runs it whole on the decode worker when the prefill worker died first."""
        params = request.sampling_params
        prefill_request = msgspec.structs.replace(
            request, hold_kv=True, sampling_params=msgspec.structs.replace(params, max_tokens=1))
        sent = time.monotonic()
        first = await self._run_prefill(prefill, prefill_request)
        if first is None:  # the prefill worker died before its token: prefill on the decode worker
            self.metrics.prefill_fallbacks.inc()
            async for delta in local(decode, request):
                yield delta
            return
        if first.queue_s is not None:
            self.metrics.queue_s.observe(first.queue_s)
            self.metrics.prefill_s.observe(max(time.monotonic() - sent - first.queue_s, 0.0))
        kv = first.kv_transfer_params
        if kv is None or params.max_tokens == 1:  # finished at its first token (or an error)
            if kv is not None:
                prefill.client.release_kv(request.request_id)
            yield msgspec.structs.replace(first, kv_transfer_params=None)
            return
        handed = False
        try:
            yield msgspec.structs.replace(first, finished=False, finish_reason=None, kv_transfer_params=None)
            decode_request = msgspec.structs.replace(request, kv_transfer_params=kv,
                                                     output_token_ids=list(first.new_token_ids))
            handed_at = time.monotonic()
            handed = True
            stream = decode.client.generate(decode_request)
            async with contextlib.aclosing(stream):
                async for delta in stream:
                    plan.prefill_done()  # the decode worker has pulled the KV (or failed to)
                    if delta.error is not None and delta.error.startswith(KV_TRANSFER_FAILED):
                        # The KV's source is gone (its prefill worker died): prefill again elsewhere.
                        raise WorkerLost("kv_transfer_failed", delta.error, prefill.worker_id)
                    if delta.kv_transfer_s is not None:
                        self.metrics.kv_transfer_s.observe(delta.kv_transfer_s)
                        if delta.new_token_ids:
                            self.metrics.first_decode_s.observe(
                                max(time.monotonic() - handed_at - delta.kv_transfer_s, 0.0))
                    # The prompt's cache hits are the prefill worker's (a copy only when they differ).
                    if delta.num_cached_tokens != first.num_cached_tokens:
                        delta = msgspec.structs.replace(delta, num_cached_tokens=first.num_cached_tokens)
                    yield delta
        except EngineDeadError as exc:
            prefill.client.release_kv(request.request_id)  # the decode worker won't pull any more
            raise lost_worker(decode, exc) from None
        finally:
            if not handed:
                prefill.client.release_kv(request.request_id)

    async def _run_prefill(self, prefill: Worker, request: AddRequest) -> TokenDelta | None:
        """The prefill worker's one finished delta; None if the worker died before it."""
        last = None
        try:
            async for delta in prefill.client.generate(request):
                last = delta
        except EngineDeadError as exc:
            logger.warning("prefill worker %s failed %s: %s", prefill.worker_id, request.request_id, exc)
            return None
        return last
