"""`python -m tidal.cluster.keys DIR`: write a cluster's CURVE key folder (`tidal.curve`).

DIR gets `server.key` / `server.key_secret` (the pair every listener serves with) and
`client.key` / `client.key_secret` (the pair clients present); both public keys are allowed
clients. Put the folder in a Kubernetes secret (`kubectl create secret generic tidal-curve
--from-file=DIR`) and mount it where `cluster.curve_key_dir` points. To let another client in, add
its `NAME.key` (public) file; to turn one out, remove it and restart the workers.
"""

from __future__ import annotations

import sys
from pathlib import Path

import zmq.auth


def write_keys(folder: str) -> None:
    """The two key pairs in `folder` (created; existing files are refused, not overwritten)."""
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    for name in ("server", "client"):
        if (root / f"{name}.key_secret").exists():
            raise FileExistsError(f"{root / name}.key_secret exists; remove it to make new keys")
        _, secret_path = zmq.auth.create_certificates(str(root), name)
        Path(secret_path).chmod(0o600)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m tidal.cluster.keys DIR", file=sys.stderr)
        return 2
    write_keys(argv[0])
    print(f"wrote the cluster's CURVE keys to {argv[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
