"""KV-aware routing against round robin on simulated workers, and the router's decision time.

Until `tidal sim` (issue 5) brings engine-calibrated simulated workers, this script runs the real
routing code (`tidal.router.policy.choose_worker`, `tidal.router.index.KVIndex`,
`tidal.hashing.block_hashes`) over a simple worker model, in simulated time:

- a worker prefills one request at a time, FIFO, in `overhead + uncached_tokens / rate` seconds
  (default 5 ms + tokens / 20k tokens/s: an assumption, not a measurement), and caches every block
  of the prompt and the reply in an LRU cache of `--cache-blocks` blocks; the index follows each
  worker's cache exactly (what KV events give the router);
- multi-turn chats: sessions start as a Poisson process; each has a system prompt shared by all
  (`--system-tokens`), then turns of a user message and a reply; the next turn comes after an
  exponential think time and resends the whole history;
- TTFT = queueing + prefill on the chosen worker (decode is not modelled). Prefix hit rate =
  cached prompt tokens / prompt tokens; "of oracle" = cached tokens / the longest prefix any worker
  held at routing time.

Decision time: an index of `--index-workers` workers and about `--index-blocks` blocks, then the
time to route a 32k-token prompt (hashing, index walk, kv policy), p50/p99 over many decisions.

    python benchmarks/router_sim.py            # prints two tables; --json PATH for details
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import random
import statistics
import sys
import time
from collections import OrderedDict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tidal.hashing import block_hashes  # noqa: E402
from tidal.router.index import KVIndex  # noqa: E402
from tidal.router.policy import KVWeights, WorkerView, choose_worker  # noqa: E402

BLOCK = 16


class SimWorker:
    def __init__(self, worker_id: str, capacity: int, index: KVIndex) -> None:
        self.worker_id, self.capacity, self.index = worker_id, capacity, index
        self.cache: OrderedDict[int, None] = OrderedDict()
        self.free_at = 0.0  # when its prefill queue drains
        self.pending_tokens = 0
        self.open = 0
        index.add_worker(worker_id)

    def overlap(self, hashes: list[int]) -> int:
        n = 0
        for h in hashes:
            if h not in self.cache:
                break
            n += 1
        return n

    def store(self, hashes: list[int]) -> None:
        for h in hashes:
            self.cache[h] = None
            self.cache.move_to_end(h)
        self.index.store(self.worker_id, hashes)
        evicted = []
        while len(self.cache) > self.capacity:
            evicted.append(self.cache.popitem(last=False)[0])
        self.index.remove(self.worker_id, evicted)


def simulate(policy: str, num_workers: int, args, seed: int = 0) -> dict:
    rng = random.Random(seed)
    index = KVIndex()
    workers = [SimWorker(f"w{i}", args.cache_blocks, index) for i in range(num_workers)]
    system = [rng.randrange(50_000) for _ in range(args.system_tokens)]
    events: list = []  # (time, seq, kind, payload)
    seq = 0
    t = 0.0
    rate = args.sessions_per_worker_s * num_workers
    for session in range(args.sessions_per_worker * num_workers):
        t += rng.expovariate(rate)
        heapq.heappush(events, (t, seq, "turn", (session, system + [], 0)))
        seq += 1
    ttft, hit, oracle_hit, prompt_total = [], 0, 0, 0
    counter = 0
    while events:
        now, _, kind, payload = heapq.heappop(events)
        if kind == "done":
            worker, tokens, hashes = payload
            worker.pending_tokens -= tokens
            worker.open -= 1
            worker.store(hashes)
            continue
        session, history, turn = payload
        user = [rng.randrange(50_000) for _ in range(args.user_tokens)]
        prompt = history + user
        hashes = block_hashes(prompt, BLOCK)
        overlaps = index.overlaps(hashes)
        views = [WorkerView(w.worker_id, "both", open_requests=w.open, pending_prefill_tokens=w.pending_tokens,
                            overlap_blocks=overlaps.get(w.worker_id, 0)) for w in workers]
        counter += 1
        chosen = choose_worker(views, policy, len(prompt), BLOCK, counter, rng, KVWeights())
        worker = workers[int(chosen.worker_id[1:])]
        cached = worker.overlap(hashes) * BLOCK
        uncached = len(prompt) - cached
        start = max(now, worker.free_at)
        worker.free_at = start + args.overhead_s + uncached / args.prefill_rate
        worker.pending_tokens += uncached
        worker.open += 1
        ttft.append(worker.free_at - now)
        hit += cached
        oracle_hit += max(overlaps.values(), default=0) * BLOCK
        prompt_total += len(prompt)
        reply = [rng.randrange(50_000) for _ in range(args.reply_tokens)]
        heapq.heappush(events, (worker.free_at, seq, "done", (worker, uncached, block_hashes(prompt + reply, BLOCK))))
        seq += 1
        if turn + 1 < args.turns:
            think = rng.expovariate(1 / args.think_s)
            heapq.heappush(events, (worker.free_at + args.reply_tokens * args.tpot_s + think, seq, "turn",
                                    (session, prompt + reply, turn + 1)))
            seq += 1
    ttft.sort()
    return {"policy": policy, "workers": num_workers, "requests": len(ttft),
            "ttft_p50_ms": 1e3 * ttft[len(ttft) // 2], "ttft_p99_ms": 1e3 * ttft[int(len(ttft) * 0.99)],
            "prefix_hit_pct": 100 * hit / prompt_total, "of_oracle_pct": 100 * hit / max(oracle_hit, 1)}


def decision_time(args) -> dict:
    rng = random.Random(1)
    index = KVIndex()
    prompt_tokens = 32768
    num_prompts = max(1, args.index_blocks // (prompt_tokens // BLOCK))
    prompts = []
    for p in range(num_prompts):
        prompt = [rng.randrange(100_000) for _ in range(prompt_tokens)]
        prompts.append(prompt)
        hashes = block_hashes(prompt, BLOCK)
        index.store(f"w{p % args.index_workers}", hashes)
        if p % 4 == 0:  # some prefixes are held by two workers
            index.store(f"w{(p + 1) % args.index_workers}", hashes[:len(hashes) // 2])
    views_base = [WorkerView(f"w{i}", "both", open_requests=rng.randrange(8),
                             pending_prefill_tokens=rng.randrange(4096), active_blocks=rng.randrange(2000))
                  for i in range(args.index_workers)]
    hash_s, walk_s, total_s = [], [], []
    for i in range(args.decisions):
        prompt = prompts[i % len(prompts)][:prompt_tokens - 7] + [1, 2, 3, 4, 5, 6, 7]
        t0 = time.perf_counter()
        hashes = block_hashes(prompt, BLOCK)
        t1 = time.perf_counter()
        overlaps = index.overlaps(hashes)
        views = [WorkerView(v.worker_id, v.role, v.open_requests, v.pending_prefill_tokens,
                            overlaps.get(v.worker_id, 0), v.active_blocks) for v in views_base]
        choose_worker(views, "kv", len(prompt), BLOCK, i, rng)
        t2 = time.perf_counter()
        hash_s.append(t1 - t0)
        walk_s.append(t2 - t1)
        total_s.append(t2 - t0)

    def p(xs, q):
        return 1e3 * sorted(xs)[min(len(xs) - 1, int(len(xs) * q))]
    return {"workers": args.index_workers, "indexed_blocks": index.num_entries, "prompt_tokens": prompt_tokens,
            "hash_p50_ms": p(hash_s, 0.5), "hash_p99_ms": p(hash_s, 0.99),
            "route_p50_ms": p(walk_s, 0.5), "route_p99_ms": p(walk_s, 0.99),
            "total_p50_ms": p(total_s, 0.5), "total_p99_ms": p(total_s, 0.99),
            "total_mean_ms": 1e3 * statistics.mean(total_s)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", default="16,64")
    parser.add_argument("--sessions-per-worker", type=int, default=30)
    parser.add_argument("--sessions-per-worker-s", type=float, default=0.25, help="session arrivals per worker per s")
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--system-tokens", type=int, default=1024)
    parser.add_argument("--user-tokens", type=int, default=256)
    parser.add_argument("--reply-tokens", type=int, default=256)
    parser.add_argument("--think-s", type=float, default=5.0)
    parser.add_argument("--tpot-s", type=float, default=0.02)
    parser.add_argument("--prefill-rate", type=float, default=20_000.0, help="tokens/s per worker (assumed)")
    parser.add_argument("--overhead-s", type=float, default=0.005)
    parser.add_argument("--cache-blocks", type=int, default=4096, help="per worker (64k tokens)")
    parser.add_argument("--index-workers", type=int, default=64)
    parser.add_argument("--index-blocks", type=int, default=1_000_000)
    parser.add_argument("--decisions", type=int, default=300)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = [simulate(policy, int(n), args) for n in args.workers.split(",") for policy in ("round_robin", "kv")]
    print("| workers | policy | requests | TTFT p50 ms | TTFT p99 ms | prefix hit % | of oracle % |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workers']} | {r['policy']} | {r['requests']} | {r['ttft_p50_ms']:.1f} | {r['ttft_p99_ms']:.1f} | "
              f"{r['prefix_hit_pct']:.1f} | {r['of_oracle_pct']:.1f} |")
    d = decision_time(args)
    print(f"\ndecision time, {d['workers']} workers, {d['indexed_blocks']} indexed blocks, {d['prompt_tokens']}-token "
          f"prompt: hashing p50 {d['hash_p50_ms']:.2f} / p99 {d['hash_p99_ms']:.2f} ms; index walk + kv policy p50 "
          f"{d['route_p50_ms']:.2f} / p99 {d['route_p99_ms']:.2f} ms; total p50 {d['total_p50_ms']:.2f} / p99 "
          f"{d['total_p99_ms']:.2f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "simulation": rows, "decision": d}, f, indent=1)


if __name__ == "__main__":
    main()
