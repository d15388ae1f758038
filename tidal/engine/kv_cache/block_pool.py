"""The pool of KV blocks: reference counts, the free queue, and the prefix-cache map.

Owns every block id in [0, num_blocks). A block is in exactly one of three states:
- used:   ref_count > 0 (held by one or more requests);
- cached: ref_count == 0 and it has a block hash (free, but its KV is still reusable);
- free:   ref_count == 0 and no hash.
Cached and free blocks both sit in `free_queue`, least recently freed first: allocation takes
from the front, evicting a cached block's hash when it does. Invariant, checked by tests:
free + cached + used == num_blocks.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass


@dataclass(eq=False)
class KVBlock:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None
    parent_hash: int = 0


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True,
                 on_evict: Callable[[int], None] | None = None, record_events: bool = False):
        assert num_blocks > 0
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self.cached: dict[int, KVBlock] = {}  # block_hash -> block holding it
        self.on_evict = on_evict
        # Cache changes since the last `take_events`, when recorded (a worker publishes them):
        # ("stored", hash, parent), ("removed", hash, 0), ("cleared", 0, 0).
        self.record_events = record_events
        self.events: list[tuple[str, int, int]] = []

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be allocated now (free and cached ones)."""
        return len(self.free_queue)

    def counts(self) -> tuple[int, int, int]:
        """(free, cached, used)."""
        cached = sum(1 for b in self.free_queue.values() if b.block_hash is not None)
        return len(self.free_queue) - cached, cached, self.num_blocks - len(self.free_queue)

    def allocate(self, n: int) -> list[KVBlock]:
        if n > len(self.free_queue):
            raise ValueError(f"asked for {n} blocks, {len(self.free_queue)} free")
        out = []
        for _ in range(n):
            _, block = self.free_queue.popitem(last=False)
            self._evict(block)
            block.ref_count = 1
            out.append(block)
        return out

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take a reference on prefix-cache hits (removing them from the free queue if idle)."""
        for block in blocks:
            if block.ref_count == 0:
                del self.free_queue[block.block_id]
            block.ref_count += 1

    def free(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one reference each; pass a request's blocks tail first so tails evict first."""
        for block in blocks:
            block.ref_count -= 1
            assert block.ref_count >= 0, block
            if block.ref_count == 0:
                self.free_queue[block.block_id] = block

    def lookup(self, block_hash: int) -> KVBlock | None:
        return self.cached.get(block_hash) if self.enable_caching else None

    def cache_block(self, block: KVBlock, block_hash: int, parent_hash: int = 0) -> None:
        """Record that `block` holds the full block with this chained hash."""
        if not self.enable_caching or block.block_hash is not None:
            return
        if block_hash in self.cached:  # an equal block is cached already; keep that one
            return
        block.block_hash = block_hash
        block.parent_hash = parent_hash
        self.cached[block_hash] = block
        if self.record_events:
            self.events.append(("stored", block_hash, parent_hash))

    def take_events(self) -> list[tuple[str, int, int]]:
        events, self.events = self.events, []
        return events

    def cached_blocks(self) -> list[tuple[int, int]]:
        """(block_hash, parent_hash) of every block in the prefix cache."""
        return [(h, b.parent_hash) for h, b in self.cached.items()]

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; only when no block is in use."""
        if len(self.free_queue) != self.num_blocks:
            return False
        recording, self.record_events = self.record_events, False
        for block in self.blocks:
            self._evict(block)
        self.record_events = recording
        if recording:
            self.events.append(("cleared", 0, 0))
        return True

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is not None:
            if self.cached.get(block.block_hash) is block:
                del self.cached[block.block_hash]
                if self.on_evict is not None:
                    self.on_evict(block.block_hash)
                if self.record_events:
                    self.events.append(("removed", block.block_hash, 0))
            block.block_hash = None
