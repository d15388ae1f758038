"""KV-aware routing against round robin over multi-turn chats, in simulated time (from the retired
benchmarks/router_sim.py): the real policy (`choose_worker`), index (`KVIndex`) and hashing
(`block_hashes`) route the turns of chat sessions that share a system prompt to workers that each
keep an LRU cache of blocks, which the index follows exactly (as KV events make it).

Workers prefill one request at a time, FIFO, in 5 ms + uncached tokens / 20k tokens/s; decode is
not modelled. The KV policy must reuse far more of each prompt than round robin, and nearly all of
what the best worker held when the request was routed (the "oracle").
"""

from __future__ import annotations

import heapq
import random
from collections import OrderedDict

from tidal.hashing import block_hashes
from tidal.router.index import KVIndex
from tidal.router.policy import KVWeights, WorkerView, choose_worker

BLOCK = 16
PREFILL_TOKENS_PER_S, OVERHEAD_S, TPOT_S = 20_000.0, 0.005, 0.02


class CachingWorker:
    def __init__(self, worker_id: str, capacity_blocks: int, index: KVIndex) -> None:
        self.worker_id, self.capacity_blocks, self.index = worker_id, capacity_blocks, index
        self.cache: OrderedDict[int, None] = OrderedDict()
        self.free_at = 0.0  # when its prefill queue drains
        self.pending_tokens = self.open = 0
        index.add_worker(worker_id)

    def cached_blocks(self, hashes: list[int]) -> int:
        n = 0
        while n < len(hashes) and hashes[n] in self.cache:
            n += 1
        return n

    def store(self, hashes: list[int]) -> None:
        for h in hashes:
            self.cache[h] = None
            self.cache.move_to_end(h)
        self.index.store(self.worker_id, hashes)
        evicted = []
        while len(self.cache) > self.capacity_blocks:
            evicted.append(self.cache.popitem(last=False)[0])
        self.index.remove(self.worker_id, evicted)


def simulate(policy: str, num_workers: int, sessions_per_worker: int = 8, turns: int = 4, system_tokens: int = 512,
             user_tokens: int = 128, reply_tokens: int = 128, cache_blocks: int = 1024, seed: int = 0) -> dict:
    """Prefix hit share of prompt tokens, and of the best worker's overlap at routing time (percent)."""
    rng = random.Random(seed)
    index = KVIndex()
    workers = [CachingWorker(f"w{i}", cache_blocks, index) for i in range(num_workers)]
    system = [rng.randrange(50_000) for _ in range(system_tokens)]
    events: list = []  # (time, seq, kind, payload)
    t = 0.0
    for session in range(sessions_per_worker * num_workers):
        t += rng.expovariate(0.25 * num_workers)
        events.append((t, len(events), "turn", (list(system), 0)))
    heapq.heapify(events)
    seq = len(events)
    hit = oracle = prompt_total = decisions = 0
    while events:
        now, _, kind, payload = heapq.heappop(events)
        if kind == "done":
            worker, tokens, hashes = payload
            worker.pending_tokens -= tokens
            worker.open -= 1
            worker.store(hashes)
            continue
        history, turn = payload
        prompt = history + [rng.randrange(50_000) for _ in range(user_tokens)]
        hashes = block_hashes(prompt, BLOCK)
        overlaps = index.overlaps(hashes)
        views = [WorkerView(w.worker_id, "both", open_requests=w.open, pending_prefill_tokens=w.pending_tokens,
                            overlap_blocks=overlaps.get(w.worker_id, 0)) for w in workers]
        decisions += 1
        chosen = choose_worker(views, policy, len(prompt), BLOCK, decisions, rng, KVWeights())
        worker = workers[int(chosen.worker_id[1:])]
        cached = worker.cached_blocks(hashes) * BLOCK
        worker.free_at = max(now, worker.free_at) + OVERHEAD_S + (len(prompt) - cached) / PREFILL_TOKENS_PER_S
        worker.pending_tokens += len(prompt) - cached
        worker.open += 1
        hit, prompt_total = hit + cached, prompt_total + len(prompt)
        oracle += max(overlaps.values(), default=0) * BLOCK
        reply = [rng.randrange(50_000) for _ in range(reply_tokens)]
        heapq.heappush(events, (worker.free_at, seq, "done",
                                (worker, len(prompt) - cached, block_hashes(prompt + reply, BLOCK))))
        if turn + 1 < turns:
            at = worker.free_at + reply_tokens * TPOT_S + rng.expovariate(1 / 5.0)
            heapq.heappush(events, (at, seq + 1, "turn", (prompt + reply, turn + 1)))
        seq += 2
    return {"prefix_hit_pct": 100 * hit / prompt_total, "of_oracle_pct": 100 * hit / max(oracle, 1)}


def test_kv_routing_reuses_the_prefixes_round_robin_throws_away():
    round_robin = simulate("round_robin", num_workers=8)
    kv = simulate("kv", num_workers=8)
    assert kv["prefix_hit_pct"] > round_robin["prefix_hit_pct"] + 10, (kv, round_robin)
    assert kv["of_oracle_pct"] > 90, kv
    assert round_robin["of_oracle_pct"] < 75, round_robin
