"""Block pool, KV cache manager and scheduler invariants (pure CPU, no model)."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, precondition

from tidal.config import SchedulerConfig
from tidal.engine.kv_cache.block_pool import BlockPool
from tidal.engine.kv_cache.manager import KVCacheManager
from tidal.engine.request import Request, RequestStatus
from tidal.engine.scheduler import Scheduler
from tidal.protocol import SamplingParams

BLOCK_SIZE = 4
EOS = 0


def check_invariants(kv: KVCacheManager, scheduler: Scheduler) -> None:
    free, cached, used = kv.pool.counts()
    assert free + cached + used == kv.num_blocks
    refs = Counter(b.block_id for table in kv.block_tables.values() for b in table)
    for block in kv.pool.blocks:
        assert block.ref_count == refs.get(block.block_id, 0), block
    assert used == len(refs)
    for block_hash, block in kv.pool.cached.items():
        assert block.block_hash == block_hash
    # Only running requests hold blocks, and enough for the tokens they have computed.
    assert set(kv.block_tables) == {r.request_id for r in scheduler.running}
    for request in scheduler.running:
        assert len(kv.block_tables[request.request_id]) * BLOCK_SIZE >= request.num_computed_tokens
    for request in scheduler.waiting:
        assert request.num_computed_tokens == 0


def run_step(scheduler: Scheduler, rng: random.Random) -> None:
    out = scheduler.schedule()
    assert out.num_tokens <= scheduler.config.token_budget or not scheduler.config.enable_chunked_prefill
    sampled = {s.request.request_id: rng.randrange(1, 50) for s in out.scheduled if s.samples}
    scheduler.update(out, sampled)


class SchedulerMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.rng = random.Random(0)
        self.kv = KVCacheManager(num_blocks=24, block_size=BLOCK_SIZE, enable_prefix_caching=True)
        self.scheduler = Scheduler(SchedulerConfig(token_budget=16, max_num_seqs=6), self.kv,
                                   max_model_len=64, eos_token_ids=[EOS])
        self.next_id = 0
        self.prefixes = [[7, 8, 9, 10, 11, 12, 13, 14], [3, 3, 3, 3]]

    @rule(prefix=st.integers(0, 2), length=st.integers(1, 30), max_tokens=st.integers(1, 20))
    def add(self, prefix, length, max_tokens):
        head = self.prefixes[prefix] if prefix < len(self.prefixes) else []
        prompt = head + [self.rng.randrange(1, 50) for _ in range(length)]
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=self.rng.random() < 0.5)
        self.scheduler.add(Request(f"r{self.next_id}", prompt[:60], params, max_model_len=64))
        self.next_id += 1

    @rule()
    def step(self):
        run_step(self.scheduler, self.rng)

    @precondition(lambda self: self.scheduler.requests)
    @rule(data=st.data())
    def abort(self, data):
        request_id = data.draw(st.sampled_from(sorted(self.scheduler.requests)))
        request = self.scheduler.abort(request_id)
        assert request.status is RequestStatus.FINISHED_ABORTED

    @invariant()
    def invariants(self):
        check_invariants(self.kv, self.scheduler)

    def teardown(self):
        for _ in range(2000):
            if not self.scheduler.has_unfinished():
                break
            run_step(self.scheduler, self.rng)
            check_invariants(self.kv, self.scheduler)
        assert not self.scheduler.has_unfinished(), "requests never finished"
        assert not self.kv.block_tables
        free, cached, used = self.kv.pool.counts()
        assert used == 0 and free + cached == self.kv.num_blocks


TestSchedulerMachine = SchedulerMachine.TestCase
TestSchedulerMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


def test_block_pool_lru_eviction_and_reuse():
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    pool.cache_block(a, 111)
    pool.cache_block(b, 222)
    pool.free([b, a])  # tail first: b is evicted before a
    assert pool.counts() == (2, 2, 0)
    (hit,) = [pool.lookup(111)]
    assert hit is a
    pool.touch([hit])
    assert pool.counts() == (2, 1, 1)
    new = pool.allocate(3)  # two free blocks then the LRU cached one (b)
    assert b in new and pool.lookup(222) is None and pool.lookup(111) is a
    with pytest.raises(ValueError):
        pool.allocate(1)


def test_prefix_hit_leaves_one_token_to_compute():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    sched = Scheduler(SchedulerConfig(token_budget=64), kv, max_model_len=64, eos_token_ids=[EOS])
    prompt = list(range(1, 9))  # exactly two blocks
    first = Request("a", prompt, SamplingParams(max_tokens=1), 64)
    sched.add(first)
    run_step(sched, random.Random(0))
    assert first.status is RequestStatus.FINISHED_LENGTH
    second = Request("b", prompt, SamplingParams(max_tokens=2), 64)
    sched.add(second)
    out = sched.schedule()
    # A full hit would leave nothing to compute: the last block is recomputed.
    assert second.num_cached_tokens == 4 and out.scheduled[0].num_new_tokens == 4


def test_preemption_by_recompute_finishes_everything():
    kv = KVCacheManager(num_blocks=6, block_size=4, enable_prefix_caching=False)
    sched = Scheduler(SchedulerConfig(token_budget=32), kv, max_model_len=24, eos_token_ids=[EOS])
    for i in range(3):
        sched.add(Request(f"r{i}", [5 + i] * 6, SamplingParams(max_tokens=12, ignore_eos=True), 24))
    rng = random.Random(1)
    preempted = 0
    for _ in range(200):
        if not sched.has_unfinished():
            break
        out = sched.schedule()
        preempted += out.num_preempted
        sched.update(out, {s.request.request_id: rng.randrange(1, 50) for s in out.scheduled if s.samples})
        check_invariants(kv, sched)
    assert preempted > 0 and sched.preemptions_total == preempted  # EngineStats.preemptions_total
    assert not sched.has_unfinished() and kv.pool.counts()[2] == 0
