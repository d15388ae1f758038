"""The etcd and NATS credentials of `tidal.config.EtcdAuth` / `NatsAuth`, read from their files.

Secrets live in files (a mounted Kubernetes secret), are read when a connection is made (a rotated
secret is picked up by the next reconnecting process) and never logged: errors name the file,
never its content.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from tidal.config import EtcdAuth, NatsAuth


def read_secret(path: str) -> str:
    """The first line of the file at `path`, without surrounding whitespace."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ValueError(f"cannot read the secret file {path}: {exc.strerror}") from None
    secret = text.strip().splitlines()[0].strip() if text.strip() else ""
    if not secret:
        raise ValueError(f"the secret file {path} is empty")
    return secret


def etcd_credentials(auth: EtcdAuth) -> dict[str, str]:
    """`aetcd.Client`'s username and password, or nothing without a user."""
    if auth.user is None:
        return {}
    return {"username": auth.user, "password": read_secret(auth.password_file)}


def nats_options(auth: NatsAuth) -> dict[str, object]:
    """nats-py `connect` options for these credentials and TLS files."""
    options: dict[str, object] = {}
    if auth.user is not None:
        options.update(user=auth.user, password=read_secret(auth.password_file))
    if auth.token_file is not None:
        options["token"] = read_secret(auth.token_file)
    if auth.creds_file is not None:
        if not Path(auth.creds_file).is_file():
            raise ValueError(f"the NATS creds file {auth.creds_file} does not exist")
        options["user_credentials"] = auth.creds_file
    if auth.uses_tls:
        context = ssl.create_default_context(cafile=auth.ca_file)
        if auth.cert_file is not None:
            context.load_cert_chain(auth.cert_file, auth.key_file)
        options["tls"] = context
    return options
