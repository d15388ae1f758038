"""Per-request block tables over the block pool, with prefix-cache lookups.

Owns the mapping request_id -> list of KVBlocks (the request's block table, in token order).
Lifecycle of a request here: `find_cached_prefix` (only while it has no blocks) ->
`allocate_slots` each step it is scheduled -> `free` when it finishes, is aborted or preempted.
After `free`, the manager holds nothing for it. Disaggregation adds two detours: a prefill
worker `hold`s a finished request's blocks (by request id, outside any request) until
`release`; a decode worker allocates blocks for KV it is still pulling with `defer_caching`,
and enters their hashes with `cache_blocks` only once the data has arrived.
"""

from __future__ import annotations

from tidal.engine.kv_cache.block_pool import BlockPool, KVBlock
from tidal.engine.request import Request
from tidal.hashing import ROOT_PARENT_HASH
from tidal.protocol import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 record_events: bool = False):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_caching=enable_prefix_caching, record_events=record_events)
        self.block_tables: dict[str, list[KVBlock]] = {}
        self._block_ids: dict[str, list[int]] = {}  # the same tables as ids, extended with them (every step reads them)
        self._num_hashed: dict[str, int] = {}  # blocks of each request already entered in the cache
        self.held: dict[str, list[KVBlock]] = {}  # finished remote prefills, kept for their puller

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.pool.num_blocks - self.pool.num_free_blocks

    def find_cached_prefix(self, request: Request) -> list[KVBlock]:
        """Longest run of cached blocks matching the request's tokens, leaving >= 1 to compute."""
        if not self.enable_prefix_caching:
            return []
        hashes = request.update_block_hashes(self.block_size)
        # At least one token must be computed to produce logits, so a full hit drops its last block.
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits = []
        for block_hash in hashes[:max_blocks]:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       cached_prefix: list[KVBlock] | None = None, defer_caching: bool = False) -> bool:
        """Make room for `num_new_tokens` more tokens after the computed (and cached) ones.

        Returns False, changing nothing, when the pool has too few blocks. With `defer_caching`
        the new full blocks are not entered in the prefix cache (their KV is not there yet).
        """
        table = self.block_tables.get(request.request_id, [])
        if table and not cached_prefix and not defer_caching:  # the common case: a running request's next token(s)
            num_computed = request.num_computed_tokens
            if -(-(num_computed + num_new_tokens) // self.block_size) <= len(table):
                self._cache_full_blocks(request, table, num_computed + num_new_tokens)
                return True
        cached_prefix = cached_prefix or []
        num_computed = request.num_computed_tokens + len(cached_prefix) * self.block_size
        num_needed = -(-(num_computed + num_new_tokens) // self.block_size) - len(table) - len(cached_prefix)
        # Cached hits that sit idle in the free queue stop being allocatable once touched.
        num_idle_hits = sum(1 for b in cached_prefix if b.ref_count == 0)
        if max(num_needed, 0) + num_idle_hits > self.pool.num_free_blocks:
            return False
        if not table:
            self.block_tables[request.request_id] = table
            self._block_ids[request.request_id] = []
            self._num_hashed[request.request_id] = 0
        self.pool.touch(cached_prefix)
        start = len(table)
        table.extend(cached_prefix)
        if num_needed > 0:
            table.extend(self.pool.allocate(num_needed))
        self._block_ids[request.request_id].extend(b.block_id for b in table[start:])
        if defer_caching:
            self._num_hashed[request.request_id] = max(self._num_hashed[request.request_id], len(cached_prefix))
        else:
            self._cache_full_blocks(request, table, num_computed + num_new_tokens)
        return True

    def cache_blocks(self, request: Request, num_tokens: int) -> None:
        """Enter the full blocks of the first `num_tokens` tokens in the prefix cache."""
        self._cache_full_blocks(request, self.block_tables[request.request_id], num_tokens)

    def _cache_full_blocks(self, request: Request, table: list[KVBlock], num_tokens: int) -> None:
        if not self.enable_prefix_caching:
            return
        num_full = min(num_tokens, request.num_tokens) // self.block_size
        done = self._num_hashed[request.request_id]
        if num_full <= done:
            return
        hashes = request.update_block_hashes(self.block_size)
        for i in range(done, num_full):
            self.pool.cache_block(table[i], hashes[i], hashes[i - 1] if i else ROOT_PARENT_HASH)
        self._num_hashed[request.request_id] = num_full

    def block_ids(self, request_id: str) -> list[int]:
        """The request's block table as ids (the manager's own list: read it, don't change it)."""
        return self._block_ids[request_id]

    def free(self, request: Request) -> None:
        table = self.block_tables.pop(request.request_id, None)
        self._block_ids.pop(request.request_id, None)
        self._num_hashed.pop(request.request_id, None)
        if table:
            self.pool.free(reversed(table))

    def hold(self, request: Request) -> list[int]:
        """Keep a finished request's blocks under its id (for a peer to pull); their ids."""
        table = self.block_tables.pop(request.request_id, [])
        self._block_ids.pop(request.request_id, None)
        self._num_hashed.pop(request.request_id, None)
        self.held[request.request_id] = table
        return [b.block_id for b in table]

    def release(self, request_id: str) -> bool:
        """Free blocks kept by `hold`; False if none were held under that id."""
        table = self.held.pop(request_id, None)
        if table is None:
            return False
        self.pool.free(reversed(table))
        return True

    def take_events(self) -> list[KVEvent]:
        """Prefix-cache changes since the last call, in order, runs merged (for the router)."""
        events: list[KVEvent] = []
        for kind, block_hash, parent_hash in self.pool.take_events():
            last = events[-1] if events else None
            if kind == "stored":
                if isinstance(last, BlockStored) and last.block_hashes[-1] == parent_hash:
                    last.block_hashes.append(block_hash)
                else:
                    events.append(BlockStored([block_hash], parent_hash))
            elif kind == "removed":
                if isinstance(last, BlockRemoved):
                    last.block_hashes.append(block_hash)
                else:
                    events.append(BlockRemoved([block_hash]))
            else:
                events.append(AllBlocksCleared())
        return events

    def cached_blocks(self) -> list[tuple[int, int]]:
        """(block_hash, parent_hash) of every block in the prefix cache (a router's resync)."""
        return self.pool.cached_blocks()
