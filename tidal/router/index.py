"""Which prompt prefixes each worker probably holds, from the router's own routing decisions.

`ApproxPrefixIndex` remembers, per worker, the chained block hashes of the prompts (and, when
they finish, the outputs) it sent there, least recently used first out once the worker's KV
capacity is exceeded. It answers "how many leading blocks of this prompt does worker W hold?".
It is an estimate (a worker may have evicted blocks sooner); the exact index follows the
workers' KV events (issue 4) and will take its place behind the same `overlap_blocks` call.
"""

from __future__ import annotations

from collections import OrderedDict


class ApproxPrefixIndex:
    def __init__(self) -> None:
        self._blocks: dict[str, OrderedDict[int, None]] = {}
        self._capacity: dict[str, int] = {}

    def add_worker(self, worker_id: str, capacity_blocks: int) -> None:
        self._blocks.setdefault(worker_id, OrderedDict())
        self._capacity[worker_id] = max(capacity_blocks, 1)

    def remove_worker(self, worker_id: str) -> None:
        self._blocks.pop(worker_id, None)
        self._capacity.pop(worker_id, None)

    def overlap_blocks(self, worker_id: str, hashes: list[int]) -> int:
        """Leading blocks of `hashes` that worker holds (by this index)."""
        held = self._blocks.get(worker_id)
        if not held:
            return 0
        n = 0
        for block_hash in hashes:
            if block_hash not in held:
                break
            n += 1
        return n

    def record(self, worker_id: str, hashes: list[int]) -> None:
        """The worker now holds these blocks (most recently used)."""
        held = self._blocks.get(worker_id)
        if held is None:
            return
        for block_hash in hashes:
            held[block_hash] = None
            held.move_to_end(block_hash)
        capacity = self._capacity[worker_id]
        while len(held) > capacity:
            held.popitem(last=False)
