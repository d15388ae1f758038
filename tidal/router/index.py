"""Which chained block hashes each worker holds, kept from the workers' KV events.

`KVIndex` maps block hash -> the workers holding it, and each worker -> its hashes. `overlaps`
gives each worker the number of leading blocks of a prompt it holds (the prefix its prefill would
skip), by binary search over the prompt's chained hashes, so its cost is the number of workers
holding the first block times log(prompt blocks), not the prompt or the index size.

`WorkerEvents` is the per-worker bookkeeping that keeps the index from drifting: events are
applied only in order (`event_id` one past the last, same `instance_id`); a gap, a new instance
or a new worker puts the worker in resync: its entries are dropped, a dump is asked for, events
that arrive meanwhile are buffered, and the dump plus the buffered events past it rebuild it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from tidal.protocol import AllBlocksCleared, BlockRemoved, BlockStored, KVDump, KVEventBatch


class KVIndex:
    def __init__(self) -> None:
        self.holders: dict[int, set[str]] = {}
        self.blocks: dict[str, set[int]] = {}

    @property
    def num_entries(self) -> int:
        return sum(len(b) for b in self.blocks.values())

    def add_worker(self, worker_id: str) -> None:
        self.blocks.setdefault(worker_id, set())

    def remove_worker(self, worker_id: str) -> None:
        self.clear_worker(worker_id)
        self.blocks.pop(worker_id, None)

    def clear_worker(self, worker_id: str) -> None:
        held = self.blocks.get(worker_id)
        if not held:
            return
        for block_hash in held:
            workers = self.holders.get(block_hash)
            if workers is not None:
                workers.discard(worker_id)
                if not workers:
                    del self.holders[block_hash]
        held.clear()

    def store(self, worker_id: str, hashes: Iterable[int]) -> None:
        held = self.blocks.setdefault(worker_id, set())
        for block_hash in hashes:
            held.add(block_hash)
            self.holders.setdefault(block_hash, set()).add(worker_id)

    def remove(self, worker_id: str, hashes: Iterable[int]) -> None:
        held = self.blocks.get(worker_id)
        if held is None:
            return
        for block_hash in hashes:
            held.discard(block_hash)
            workers = self.holders.get(block_hash)
            if workers is not None:
                workers.discard(worker_id)
                if not workers:
                    del self.holders[block_hash]

    def apply(self, worker_id: str, events) -> None:
        for event in events:
            if isinstance(event, BlockStored):
                self.store(worker_id, event.block_hashes)
            elif isinstance(event, BlockRemoved):
                self.remove(worker_id, event.block_hashes)
            elif isinstance(event, AllBlocksCleared):
                self.clear_worker(worker_id)

    def overlaps(self, hashes: list[int]) -> dict[str, int]:
        """Leading blocks of `hashes` each worker holds (workers holding none are left out).

        Per worker holding the first block, a binary search for the first block it lacks: a
        worker's cached blocks are prefix-closed (a request's blocks are freed tail first and
        evicted least recently freed first, so a child goes before its parent), which makes
        "holds block i" true up to some i and false after. Cost: workers x log(prompt blocks).
        """
        result: dict[str, int] = {}
        first = self.holders.get(hashes[0]) if hashes else None
        if not first:
            return result
        holders = self.holders
        for worker_id in first:
            lo, hi = 1, len(hashes)  # block lo-1 is held; find the first index >= lo not held
            while lo < hi:
                mid = (lo + hi) // 2
                if worker_id in holders.get(hashes[mid], ()):
                    lo = mid + 1
                else:
                    hi = mid
            result[worker_id] = lo
        return result


@dataclass
class WorkerEvents:
    """Event ordering and resync state of one worker in one router."""

    instance_id: str | None = None
    last_event_id: int = 0
    resyncing: bool = True  # a new worker starts in resync: its state comes from a dump
    dump_requested: bool = False
    buffered: list[KVEventBatch] = field(default_factory=list)

    def accept(self, batch: KVEventBatch) -> bool:
        """True: apply it now. False: it is buffered (resync running, or it starts one: see
        `needs_resync`)."""
        if self.resyncing:
            self.buffered.append(batch)
            return False
        if batch.instance_id != self.instance_id or batch.event_id != self.last_event_id + 1:
            if batch.instance_id == self.instance_id and batch.event_id <= self.last_event_id:
                return False  # a duplicate of what was applied
            self.resyncing = True
            self.buffered = [batch]
            return False
        self.last_event_id = batch.event_id
        return True

    def start_resync(self) -> None:
        self.resyncing = True

    def finish_resync(self, dump: KVDump) -> list[KVEventBatch] | None:
        """The batches to apply after loading the dump, in order; None if they leave a gap
        (then resync again)."""
        self.instance_id = dump.instance_id
        self.last_event_id = dump.event_id
        later = sorted((b for b in self.buffered if b.instance_id == dump.instance_id
                        and b.event_id > dump.event_id), key=lambda b: b.event_id)
        self.buffered = []
        for batch in later:
            if batch.event_id != self.last_event_id + 1:
                if batch.event_id <= self.last_event_id:
                    continue
                return None
            self.last_event_id = batch.event_id
        self.resyncing = False
        return later
