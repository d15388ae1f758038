"""ZMQ CURVE security of the cluster's TCP planes: the keys, and applying them to sockets.

`CurveKeys` is what one process holds, loaded once from a key folder (`PlaneConfig.curve_key_dir`,
a Kubernetes secret mounted as files, written by `tidal.cluster.keys`):
- `server.key_secret`: the cluster's server key pair. Every listener (a worker's request socket,
  its zmq KV server, a ZMQ event publisher) serves with it, so a client needs to know one public
  key for all of them, not one per worker;
- `client.key_secret` (optional): the key pair clients (frontends, workers pulling KV or releasing
  it) present; without it they present the server pair;
- every `*.key` file: a public key a client may present. Anything else is refused.
The files are pyzmq's certificate format (`zmq.auth`); secret keys stay out of `repr` and logs.

A server socket (`serve`) gets the server pair and the `CURVE_SERVER` flag; a client socket
(`dial`) gets the client pair and the server's public key. Which clients a server accepts is
decided by ZAP: `Authenticator` runs pyzmq's ZAP handler thread on a context and answers with
the allowed keys; it must be started before a server socket of that context binds, and stopped
before the context terminates. A client with no keys, another server key or an unknown client key
gets no connection (its messages wait in its own queue); the server keeps serving everyone else.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

logger = logging.getLogger(__name__)

SERVER_KEY = "server.key_secret"
CLIENT_KEY = "client.key_secret"
ZAP_DOMAIN = "tidal"


@dataclass(frozen=True)
class CurveKeys:
    """One process's CURVE keys (z85 bytes)."""

    server_public: bytes
    server_secret: bytes = field(repr=False)
    client_public: bytes
    client_secret: bytes = field(repr=False)
    allowed_clients: frozenset[bytes]
    """The public keys a server accepts from clients."""

    @classmethod
    def load(cls, folder: str) -> CurveKeys:
        """The keys in `folder`; ValueError naming the file when one is missing or unreadable."""
        root = Path(folder)
        server_public, server_secret = _key_pair(root / SERVER_KEY)
        client_public, client_secret = ((server_public, server_secret) if not (root / CLIENT_KEY).exists()
                                        else _key_pair(root / CLIENT_KEY))
        try:
            allowed = frozenset(zmq.auth.load_certificates(str(root)))
        except (OSError, ValueError) as exc:
            raise ValueError(f"CURVE key folder {folder}: {exc}") from None
        if client_public not in allowed:
            raise ValueError(f"{folder}: the client public key is not among its *.key files: "
                             f"no server would accept this process")
        return cls(server_public, server_secret, client_public, client_secret, allowed)

    def serve(self, sock: zmq.Socket) -> None:
        """Make `sock` a CURVE server (before it binds)."""
        sock.curve_secretkey = self.server_secret
        sock.curve_publickey = self.server_public
        sock.curve_server = True
        sock.zap_domain = ZAP_DOMAIN.encode()

    def dial(self, sock: zmq.Socket) -> None:
        """Make `sock` a CURVE client of the cluster's servers (before it connects)."""
        sock.curve_secretkey = self.client_secret
        sock.curve_publickey = self.client_public
        sock.curve_serverkey = self.server_public

    def allows(self, domain: str, client_key: bytes) -> bool:
        """ZAP's question: may a client with this public key (z85) connect?"""
        return client_key in self.allowed_clients


def _key_pair(path: Path) -> tuple[bytes, bytes]:
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise ValueError(f"CURVE key {path}: {exc}") from None
    if secret is None:
        raise ValueError(f"CURVE key {path}: holds no secret key")
    return public, secret


def serve(keys: CurveKeys | None, sock: zmq.Socket) -> None:
    """`keys.serve(sock)`, or nothing without keys (plain TCP)."""
    if keys is not None:
        keys.serve(sock)


def dial(keys: CurveKeys | None, sock: zmq.Socket) -> None:
    """`keys.dial(sock)`, or nothing without keys (plain TCP)."""
    if keys is not None:
        keys.dial(sock)


class Authenticator:
    """The ZAP handler of one context: accepts the clients `keys` allows and logs the first
    refusal of each other key. A no-op without keys."""

    def __init__(self, ctx: zmq.Context, keys: CurveKeys | None) -> None:
        self.keys = keys
        self._refused: set[bytes] = set()
        self._thread: ThreadAuthenticator | None = None
        if keys is not None:
            self._thread = ThreadAuthenticator(ctx, log=logging.getLogger("tidal.curve.zap"))
            self._thread.start()
            self._thread.configure_curve_callback(ZAP_DOMAIN, credentials_provider=self)

    def callback(self, domain: str, client_key: bytes) -> bool:
        """pyzmq's credentials-provider hook (on the ZAP thread)."""
        allowed = self.keys.allows(domain, client_key)
        if not allowed and client_key not in self._refused:
            self._refused.add(client_key)
            logger.warning("refused a CURVE client with an unknown public key %s", client_key.decode())
        return allowed

    def stop(self) -> None:
        if self._thread is not None:
            self._thread.stop()
            self._thread = None
