"""TCP ports: which one is free now, for a process that binds it right after (a worker's request
socket, a test's or a benchmark's server)."""

from __future__ import annotations

import socket

WILDCARD_HOSTS = ("", "0.0.0.0", "*", "::", "[::]")
"""Hosts that mean "every interface" in a bind address."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now (a wildcard host: on every interface)."""
    with socket.socket() as sock:
        sock.bind(("0.0.0.0" if host in WILDCARD_HOSTS else host, 0))
        return sock.getsockname()[1]
