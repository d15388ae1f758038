"""Who may call what: API keys, the admin routes' rule, per-key limits, and CORS.

`install_access_control(app, server)` wraps the HTTP app in two layers (outermost first):
- CORS (Starlette's `CORSMiddleware`), only when `ServerConfig.allowed_origins` names origins: it
  answers preflight requests itself and adds the CORS headers to every response, refusals included,
  so a browser can read them;
- `AccessControl`, which sorts each request by its path:
  open      /health, /live, /ready, /version and /metrics (unless `require_api_key_for_metrics`):
            anyone, always (probes and scrapers carry no key);
  admin     /admin/...: with keys, a valid key; with none, only loopback clients (403 otherwise),
            since they would otherwise be the one unauthenticated door to fleet internals;
  API       everything else (/v1/..., /tokenize, /detokenize, a route added later): with keys, a
            valid key (401 otherwise), then the key's limits (429 with Retry-After).
A key is compared in constant time (the SHA-256 digests of the sent and of every configured key,
all of them compared, whichever matched). The client's address is uvicorn's: with a reverse proxy
on the same machine that sends no X-Forwarded-For, every client looks local, so set a key there.

One per app (one per API server process); its `KeyLimiter` holds that process's counts.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import time
from collections.abc import Callable

from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from tidal.config import ServerConfig
from tidal.frontend.errors import OpenAIError
from tidal.frontend.key_limits import KeyLimiter, Refusal

OPEN_PATHS = frozenset({"/health", "/live", "/ready", "/version"})
METRICS_PATH = "/metrics"
ADMIN_PREFIX = "/admin"


def missing_or_invalid_key(sent: bool) -> OpenAIError:
    message = ("Incorrect API key provided." if sent else
               "Missing API key: send it in the Authorization header (Bearer KEY).")
    return OpenAIError(401, message, error_type="invalid_request_error", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})


def admin_forbidden() -> OpenAIError:
    return OpenAIError(403, "Admin routes answer only clients on this machine while the server has no API "
                            "key (set --api-key or TIDAL_API_KEY to reach them from elsewhere).",
                       error_type="permission_denied", code="forbidden")


def rate_limited(refusal: Refusal, server: ServerConfig) -> OpenAIError:
    if refusal.limit == "concurrent_requests":
        message = (f"This API key has {server.max_concurrent_requests_per_key} requests open, its limit "
                   "(max_concurrent_requests_per_key); retry when one has finished.")
    else:
        message = (f"This API key may start {server.max_requests_per_minute_per_key} requests per minute "
                   f"(max_requests_per_minute_per_key); retry in {refusal.retry_after_s} s.")
    return OpenAIError(429, message, error_type="requests", code="rate_limit_exceeded",
                       headers={"Retry-After": str(refusal.retry_after_s)})


def _digest(key: str | bytes) -> bytes:
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).digest()


def _bearer_token(scope: Scope) -> bytes | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" and token.strip() else None
    return None


def is_loopback(client: tuple[str, int] | None) -> bool:
    """Whether the peer address is this machine's loopback (127.0.0.0/8, ::1, ::ffff:127.x)."""
    if client is None:
        return False
    try:
        address = ipaddress.ip_address(client[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


class AccessControl:
    def __init__(self, app: ASGIApp, server: ServerConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.app = app
        self.server = server
        self._digests = [_digest(key) for key in server.api_keys]
        self._open = OPEN_PATHS if server.require_api_key_for_metrics else OPEN_PATHS | {METRICS_PATH}
        self.limiter = KeyLimiter(server.max_requests_per_minute_per_key, server.max_concurrent_requests_per_key)
        self._clock = clock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self._open:
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        admin = path == ADMIN_PREFIX or path.startswith(ADMIN_PREFIX + "/")
        if not self._digests:
            if admin and not is_loopback(scope.get("client")):
                await admin_forbidden().response()(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        token = _bearer_token(scope)
        key = self.key_of(token) if token is not None else None
        if key is None:
            await missing_or_invalid_key(token is not None).response()(scope, receive, send)
            return
        if admin or not self.limiter.enabled:
            await self.app(scope, receive, send)
            return
        refusal = self.limiter.admit(key, self._clock())
        if refusal is not None:
            await rate_limited(refusal, self.server).response()(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self.limiter.release(key)

    def key_of(self, token: bytes) -> str | None:
        """The configured key `token` is (as `key<index>`), or None. Every key is compared."""
        sent = _digest(token)
        matched = None
        for index, digest in enumerate(self._digests):
            if hmac.compare_digest(sent, digest) and matched is None:
                matched = f"key{index}"
        return matched


def install_access_control(app, server: ServerConfig) -> None:
    """Adds `AccessControl`, then CORS outside it when origins are configured (call after the app's
    other middleware: the last one added runs first)."""
    app.add_middleware(AccessControl, server=server)
    if server.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(server.allowed_origins),
                           allow_methods=list(server.allowed_methods), allow_headers=list(server.allowed_headers),
                           allow_credentials=server.allow_credentials)
