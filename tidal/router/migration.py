"""Request migration: what the router sends to a new worker when a request's worker goes away.

A request that loses its worker mid-stream (the worker died or left, or the prefill worker
whose KV the decode worker was pulling did) moves: the router sends the original prompt plus
every token already streamed as the new prompt, with `max_tokens` and `min_tokens` reduced by
what was generated and the same sampling parameters; `num_resumed_tokens` tells a seeded
request how far along its random stream is. Greedy continuations are the tokens an
uninterrupted run gives; the client sees one stream (same request id, usage of the original
prompt). `Router.generate` does the moving (up to `RouterConfig.max_migrations` times); this
module holds the pure parts.
"""

from __future__ import annotations

import msgspec

from tidal.protocol import AddRequest

REASONS = ("worker_died", "worker_left", "kv_transfer_failed")
"""Why a request moved (the label of `tidal_request_migrations_total`):
- worker_died: its decode (or aggregated) worker died, or its connection dropped;
- worker_left: its worker left (SIGTERM) before the request finished within the grace period;
- kv_transfer_failed: the decode worker could not pull the prompt's KV (the prefill worker died)."""


class WorkerLost(Exception):
    """A request's worker went away mid-stream: the request may move elsewhere."""

    def __init__(self, reason: str, message: str, worker_id: str):
        super().__init__(message)
        self.reason = reason
        self.worker_id = worker_id  # the worker not to route the moved request to


def resume_request(request: AddRequest, output: list[int]) -> AddRequest | None:
    """`request` (as the client sent it) continued after `output` tokens were streamed, or None
    when nothing is left to generate."""
    params = request.sampling_params
    left = params.max_tokens - len(output)
    if left < 1:
        return None
    if not output:
        return request
    return msgspec.structs.replace(
        request, prompt_token_ids=[*request.prompt_token_ids, *output], num_resumed_tokens=len(output),
        sampling_params=msgspec.structs.replace(params, max_tokens=left,
                                                min_tokens=max(0, params.min_tokens - len(output))))
