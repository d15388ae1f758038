"""The request log: one line per request an operator can grep, on the `tidal.requests` logger at INFO.

Two kinds of line, both `key=value` pairs (the JSON log format carries the same keys as fields):

    finished request_id=chatcmpl-1f.. status=200 finish_reason=stop route=remote worker=decode-0
      prefill_worker=prefill-1 migrations=0 prompt_tokens=812 cached_tokens=512 output_tokens=64
      ttft_ms=41.3 e2e_ms=655.0
    refused path=/v1/chat/completions status=400 error=BadRequestError param=messages message="..."

`finished` comes from `GenerationRun` when a request's engine stream ends, however it ended (its
status: 200, 499 when the client went away, or the status of the error the client got, in the body
or as the stream's last event); `refused` from the HTTP layer for a request answered with an error
before it reached the engine (validation, unknown model, admission's 503). The route and workers
are the router's (`Router.route_of`): `agg` (no prefill workers), `local` or `remote` prefill.

Cost: nothing per token; per request one dict and, when the logger is enabled, one formatted line.
Off with `ServerConfig.log_requests` (`--disable-log-requests`) or by raising the logger's level.
"""

from __future__ import annotations

import logging

from tidal.logs import FIELDS

logger = logging.getLogger("tidal.requests")

MAX_MESSAGE_CHARS = 200
"""A refusal's message is cut here: a line per request, not a copy of a client's megabyte prompt."""


class RequestLog:
    def __init__(self, enabled: bool = True, log: logging.Logger = logger) -> None:
        self.enabled = enabled
        self.log = log

    def finished(self, request_id: str, status: int, finish_reason: str, route, prompt_tokens: int,
                 cached_tokens: int, output_tokens: int, ttft_s: float | None, e2e_s: float) -> None:
        """One request whose engine stream ended; `route`: a `tidal.router.plan.RouteInfo`, or None
        when the engine is no router or the request never got a worker."""
        if not (self.enabled and self.log.isEnabledFor(logging.INFO)):
            return
        fields = {"request_id": request_id, "status": status, "finish_reason": finish_reason,
                  "route": route.route if route else None, "worker": route.worker_id if route else None,
                  "prefill_worker": route.prefill_worker_id if route else None,
                  "migrations": route.migrations if route else 0, "prompt_tokens": prompt_tokens,
                  "cached_tokens": cached_tokens, "output_tokens": output_tokens,
                  "ttft_ms": round(ttft_s * 1e3, 1) if ttft_s is not None else None, "e2e_ms": round(e2e_s * 1e3, 1)}
        self.log.info("finished %s", _pairs(fields), extra={FIELDS: {"event": "finished", **fields}})

    def refused(self, path: str, status: int, error_type: str, message: str, param: str | None = None) -> None:
        """A request answered with an error before it reached the engine."""
        if not (self.enabled and self.log.isEnabledFor(logging.INFO)):
            return
        fields = {"path": path, "status": status, "error": error_type, "param": param,
                  "message": message[:MAX_MESSAGE_CHARS]}
        self.log.info("refused %s", _pairs(fields), extra={FIELDS: {"event": "refused", **fields}})


def _pairs(fields: dict) -> str:
    """`key=value` for each field with a value; values with spaces or quotes are quoted (logfmt)."""
    out = []
    for key, value in fields.items():
        if value is None:
            continue
        text = str(value)
        if not text or any(c in text for c in ' "=\n'):
            text = '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
        out.append(f"{key}={text}")
    return " ".join(out)
