"""Chained block hashes of token ids: the one function the engine and the router share.

A full block of `block_size` token ids hashes together with its parent block's hash, so equal
hashes mean equal prefixes (up to 64-bit collisions). Partial trailing blocks have no hash.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xxhash

ROOT_PARENT_HASH = 0


def hash_block(parent_hash: int, token_ids: Sequence[int]) -> int:
    """Hash of one full block given its parent's hash (ROOT_PARENT_HASH for the first)."""
    h = xxhash.xxh3_64()
    h.update(parent_hash.to_bytes(8, "little"))
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return h.intdigest()


def block_hashes(token_ids: Sequence[int], block_size: int, parent_hash: int = ROOT_PARENT_HASH) -> list[int]:
    """Chained hashes of every full block of `token_ids`."""
    hashes = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent_hash = hash_block(parent_hash, token_ids[start : start + block_size])
        hashes.append(parent_hash)
    return hashes
