"""The HTTP server's flags on `tidal serve` and `tidal frontend`, in vLLM's spellings: API keys,
per-key limits, CORS, TLS, the chat template and uvicorn's log level.

`add_server_flags(parser)` defines them (every one defaults to None: "not given"), and
`server_overrides(args)` is the `frontend:` section values the given ones set, to lay over a
deployment config (`tidal.cli`) or a cluster file (`tidal.cluster.commands`); the values are then
checked where every other frontend value is (`ServerConfig`, through the derived YAML section).
"""

from __future__ import annotations

import argparse
import json
import typing

from tidal.config import LogLevel


def string_list(text: str) -> list[str]:
    """vLLM's JSON list (`'["https://a.example"]'`), or comma-separated values."""
    text = text.strip()
    if text.startswith("["):
        try:
            values = json.loads(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"not a JSON list: {exc}") from None
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise argparse.ArgumentTypeError("expected a JSON list of strings")
        return values
    return [part.strip() for part in text.split(",") if part.strip()]


def add_server_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("HTTP server: API keys, limits, CORS, TLS (vLLM's spellings)")
    g.add_argument("--api-key", action="append", dest="api_keys", default=None, metavar="KEY",
                   help="clients must send 'Authorization: Bearer KEY' on every route but /health, /live, "
                        "/ready, /version and /metrics (401 otherwise); repeat for several keys (default: "
                        "$TIDAL_API_KEY, comma-separated). With no key, /admin routes answer loopback "
                        "clients only")
    g.add_argument("--require-api-key-for-metrics", action="store_true", default=None,
                   help="/metrics needs a key too")
    g.add_argument("--max-requests-per-minute-per-key", type=int, default=None, metavar="N",
                   help="429 with Retry-After past N requests a minute per key, per frontend process (0: off)")
    g.add_argument("--max-concurrent-requests-per-key", type=int, default=None, metavar="N",
                   help="429 past N open requests per key, per frontend process (0: off)")
    g.add_argument("--allowed-origins", type=string_list, default=None,
                   help="CORS origins, a JSON list or comma-separated ('*': any); default: no CORS headers")
    g.add_argument("--allowed-methods", type=string_list, default=None, help="CORS methods (default '*')")
    g.add_argument("--allowed-headers", type=string_list, default=None, help="CORS headers (default '*')")
    g.add_argument("--allow-credentials", action="store_true", default=None, help="CORS: allow credentials")
    g.add_argument("--ssl-keyfile", default=None, help="serve HTTPS with this private key (PEM) ...")
    g.add_argument("--ssl-certfile", default=None, help="... and this certificate chain (PEM)")
    g.add_argument("--ssl-ca-certs", default=None, help="CA certificates to check client certificates against")
    g.add_argument("--ssl-cert-reqs", type=int, default=None, choices=[0, 1, 2],
                   help="client certificates: 0 not asked for, 1 checked when sent, 2 required")
    g.add_argument("--chat-template", default=None,
                   help="a Jinja chat template (a file, or the template itself) instead of the model's")
    g.add_argument("--uvicorn-log-level", default=None, choices=typing.get_args(LogLevel),
                   help="the HTTP server's log level (default: --log-level)")


FLAG_TO_FIELD = {
    "api_keys": "api_keys", "require_api_key_for_metrics": "require_api_key_for_metrics",
    "max_requests_per_minute_per_key": "max_requests_per_minute_per_key",
    "max_concurrent_requests_per_key": "max_concurrent_requests_per_key",
    "allowed_origins": "allowed_origins", "allowed_methods": "allowed_methods",
    "allowed_headers": "allowed_headers", "allow_credentials": "allow_credentials",
    "ssl_keyfile": "ssl_keyfile", "ssl_certfile": "ssl_certfile", "ssl_ca_certs": "ssl_ca_certs",
    "ssl_cert_reqs": "ssl_cert_reqs", "chat_template": "chat_template", "uvicorn_log_level": "log_level",
}
"""Each flag's `args` attribute -> the `frontend:` section field it sets."""


def server_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The frontend section values the given flags set (flags not given are left out)."""
    return {field: getattr(args, flag) for flag, field in FLAG_TO_FIELD.items() if getattr(args, flag) is not None}
