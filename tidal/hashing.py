"""Chained block hashes of token ids: the one function the engine and the router share.

A full block of `block_size` token ids hashes together with its parent block's hash, so equal
hashes mean equal prefixes (up to 64-bit collisions). Partial trailing blocks have no hash.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence

import xxhash

ROOT_PARENT_HASH = 0
_xxh3 = xxhash.xxh3_64_intdigest


def block_hashes(token_ids: Sequence[int], block_size: int, parent_hash: int = ROOT_PARENT_HASH) -> list[int]:
    """Chained hashes of every full block of `token_ids`: block i's hash is xxh3-64 of its token ids
    as int64 (native byte order: little-endian on every platform we run), seeded with block i-1's hash
    (`parent_hash` for the first). One array conversion, then one call a block."""
    num_blocks = len(token_ids) // block_size
    data = memoryview(array("q", token_ids[:num_blocks * block_size])).cast("B")
    step = block_size * 8
    hashes = []
    for start in range(0, num_blocks * step, step):
        parent_hash = _xxh3(data[start:start + step], parent_hash)
        hashes.append(parent_hash)
    return hashes
