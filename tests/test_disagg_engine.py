"""Disaggregation inside the engine, with two engines in one process and the fake transfer.

A prefill engine runs each prompt with max_tokens=1 and `hold_kv`; a decode engine pulls the
KV it reports and generates the rest. The plumbing a worker does (sending `ReleaseKV` to the
prefill side) is done here by `_pump`. Checked: greedy tokens equal an aggregated engine's,
pulled requests reuse the decode side's prefix cache, and every abort, failure or timeout
leaves no block used on either side.
"""

from __future__ import annotations

import time

import msgspec
import pytest

from tidal.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from tidal.engine.engine import EngineCore
from tidal.engine.factory import build_engine
from tidal.protocol import AddRequest, SamplingParams, TokenDelta
from tidal.transfer import KVTransferConfig

BLOCK = 4


def _config(token_budget: int = 32) -> EngineConfig:
    return EngineConfig(model=ModelConfig(model="dummy:tiny-llama", dtype="float32", seed=3),
                        cache=CacheConfig(block_size=BLOCK, num_blocks=96),
                        scheduler=SchedulerConfig(token_budget=token_budget))


def _engine(worker_id: str, **transfer) -> EngineCore:
    engine = build_engine(_config(), worker_id=worker_id, transfer_config=KVTransferConfig(backend="fake", **transfer))
    engine.connector.release_addr = worker_id
    return engine


@pytest.fixture()
def pair():
    prefill, decode = _engine("p"), _engine("d")
    yield prefill, decode
    prefill.close()
    decode.close()


@pytest.fixture(scope="module")
def aggregated():
    engine = build_engine(_config())
    yield engine
    engine.close()


def _pump(engines: dict[str, EngineCore], steps: int = 1) -> list[TokenDelta]:
    """Step every engine once per round; deliver KV releases like the workers do."""
    out = []
    for _ in range(steps):
        for engine in engines.values():
            if engine.has_work() or engine.has_pulls():
                out.extend(engine.step())
            for addr, request_id in engine.connector.take_releases():
                engines[addr].connector.release(request_id)
    return out


def _run_to_end(engines, request_id: str, timeout_s: float = 20.0) -> list[TokenDelta]:
    got = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got += [d for d in _pump(engines) if d.request_id == request_id]
        if got and got[-1].finished:
            return got
        time.sleep(0.001)
    raise AssertionError(f"{request_id} did not finish")


def _greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def _remote_prefill(engines, request_id: str, prompt: list[int], params: SamplingParams) -> TokenDelta:
    """The prefill side's run (max_tokens=1, hold_kv) to its one finished delta."""
    engines["p"].add_request(AddRequest(request_id=request_id, prompt_token_ids=prompt, hold_kv=True,
                                        sampling_params=msgspec.structs.replace(params, max_tokens=1)))
    return _run_to_end(engines, request_id)[-1]


def _hand_off(decode: EngineCore, request_id: str, prompt: list[int], first: TokenDelta,
              params: SamplingParams, kv_transfer_params=None) -> None:
    """The decode side takes the request with the prefill's first token and KV."""
    decode.add_request(AddRequest(request_id=request_id, prompt_token_ids=prompt, sampling_params=params,
                                  kv_transfer_params=kv_transfer_params or first.kv_transfer_params,
                                  output_token_ids=first.new_token_ids))


def _disagg_generate(prefill: EngineCore, decode: EngineCore, request_id: str, prompt: list[int],
                     max_tokens: int) -> list[int]:
    engines = {"p": prefill, "d": decode}
    params = _greedy(max_tokens)
    first = _remote_prefill(engines, request_id, prompt, params)
    assert first.finish_reason == "length" and first.kv_transfer_params is not None
    _hand_off(decode, request_id, prompt, first, params)
    rest = _run_to_end(engines, request_id)
    assert rest[-1].finish_reason == "length", rest[-1]
    return first.new_token_ids + [t for d in rest for t in d.new_token_ids]


def _agg_generate(engine: EngineCore, request_id: str, prompt: list[int], max_tokens: int) -> list[int]:
    engine.add_request(AddRequest(request_id=request_id, prompt_token_ids=prompt, sampling_params=_greedy(max_tokens)))
    return [t for d in _run_to_end({"a": engine}, request_id) for t in d.new_token_ids]


def _assert_nothing_held(*engines: EngineCore) -> None:
    for engine in engines:
        assert engine.kv.num_used_blocks == 0, engine.worker_id
        assert not engine.kv.held and not engine.connector.pulls and not engine.scheduler.requests, engine.worker_id


PROMPTS = [list(range(5, 5 + n)) for n in (3, 4, 9, 16, 23)]


def test_disaggregated_greedy_equals_aggregated(pair, aggregated):
    prefill, decode = pair
    for i, prompt in enumerate(PROMPTS):
        want = _agg_generate(aggregated, f"a{i}", prompt, 7)
        got = _disagg_generate(prefill, decode, f"r{i}", prompt, 7)
        assert got == want, (len(prompt), got, want)
    _assert_nothing_held(prefill, decode)


def test_pull_reuses_decode_prefix_cache_and_copies_the_rest(pair, aggregated):
    prefill, decode = pair
    base = list(range(40, 60))  # 5 full blocks
    _disagg_generate(prefill, decode, "t1", base, 3)
    transfers_before = decode.connector.transfer_bytes_total
    longer = base + list(range(100, 110))
    got = _disagg_generate(prefill, decode, "t2", longer, 4)
    assert got == _agg_generate(aggregated, "t2-agg", longer, 4)
    # Turn 2 pulled only the blocks the decode side did not have: 30 tokens -> 8 blocks, 5 cached.
    per_block = decode.connector.backend.cache[:, :, :, 0].numel() * decode.connector.backend.cache.element_size()
    assert decode.connector.transfer_bytes_total - transfers_before == 3 * per_block
    _assert_nothing_held(prefill, decode)


def test_seeded_sampling_continues_the_same_stream(pair, aggregated):
    prefill, decode = pair
    params = SamplingParams(max_tokens=6, temperature=0.9, seed=11, ignore_eos=True)
    prompt = list(range(7, 20))
    aggregated.add_request(AddRequest(request_id="s-agg", prompt_token_ids=prompt, sampling_params=params))
    want = [t for d in _run_to_end({"a": aggregated}, "s-agg") for t in d.new_token_ids]
    engines = {"p": prefill, "d": decode}
    first = _remote_prefill(engines, "s", prompt, params)
    _hand_off(decode, "s", prompt, first, params)
    rest = [t for d in _run_to_end(engines, "s") for t in d.new_token_ids]
    assert first.new_token_ids + rest == want


def test_abort_while_prefilling_queued_held_pulling_and_decoding():
    prefill, decode = _engine("p", debug_delay_s=0.2), _engine("d", debug_delay_s=0.2)
    engines = {"p": prefill, "d": decode}
    try:
        prompt = list(range(3, 40))
        # queued and prefilling on the prefill side
        for rid in ("q1", "q2"):
            prefill.add_request(AddRequest(request_id=rid, prompt_token_ids=prompt, hold_kv=True,
                                           sampling_params=_greedy(1)))
        _pump(engines)  # q1 takes the budget with a chunk; q2 waits
        prefill.abort_request("q2")
        prefill.abort_request("q1")
        # held: finished prefill, no decode came; an abort (the frontend's release) frees it
        _remote_prefill(engines, "h", prompt, _greedy(1))
        assert prefill.kv.held
        prefill.abort_request("h")
        # pulling: the abort waits for the copy to end, then frees both sides
        first = _remote_prefill(engines, "x", prompt, _greedy(1))
        _hand_off(decode, "x", prompt, first, _greedy(20))
        _pump(engines)
        assert decode.connector.pulls["x"].transfer is not None and not decode.connector.pulls["x"].transfer.done()
        decode.abort_request("x")
        assert decode.kv.num_used_blocks > 0  # deferred: the copy may still be writing
        end = _run_to_end(engines, "x")
        assert end[-1].finish_reason == "abort"
        # decoding
        first = _remote_prefill(engines, "y", prompt, _greedy(1))
        _hand_off(decode, "y", prompt, first, _greedy(50))
        got = []
        while len(got) < 3:
            got += [d for d in _pump(engines) if d.request_id == "y" and d.new_token_ids]
        decode.abort_request("y")
        _pump(engines, 3)
        _assert_nothing_held(prefill, decode)
    finally:
        prefill.close()
        decode.close()


def test_failed_and_timed_out_pulls_free_both_sides():
    prefill, decode = _engine("p"), _engine("d", timeout_s=0.05, debug_delay_s=0.5)
    engines = {"p": prefill, "d": decode}
    try:
        prompt = list(range(3, 30))
        first = _remote_prefill(engines, "t", prompt, _greedy(1))
        _hand_off(decode, "t", prompt, first, _greedy(5))
        end = _run_to_end(engines, "t")[-1]
        assert end.finish_reason == "error" and "KV transfer failed" in end.error
        assert decode.connector.transfer_failures_total == 1
        _assert_nothing_held(prefill, decode)
        # A source that vanished (a prefill worker gone): the pull fails, nothing leaks.
        first = _remote_prefill(engines, "v", prompt, _greedy(1))
        prefill.close()
        bad = msgspec.structs.replace(first.kv_transfer_params, release_addr="d")
        _hand_off(decode, "v", prompt, first, _greedy(5), kv_transfer_params=bad)
        end = _run_to_end({"d": decode}, "v")[-1]
        assert end.finish_reason == "error"
        assert decode.kv.num_used_blocks == 0 and not decode.connector.pulls
    finally:
        prefill.close()
        decode.close()


def test_prefill_that_stops_at_its_first_token_holds_nothing(pair):
    prefill, _ = pair
    params = SamplingParams(max_tokens=1, temperature=0.0, stop_token_ids=tuple(range(prefill.vocab_size)))
    prefill.add_request(AddRequest(request_id="e", prompt_token_ids=[1, 2, 3], hold_kv=True, sampling_params=params))
    end = _run_to_end({"p": prefill}, "e")[-1]
    assert end.finish_reason == "stop" and end.kv_transfer_params is None
    _assert_nothing_held(prefill)


def test_requests_without_a_transfer_backend_are_refused(aggregated):
    aggregated.add_request(AddRequest(request_id="nb", prompt_token_ids=[1, 2, 3], hold_kv=True,
                                      sampling_params=_greedy(1)))
    end = aggregated.step()[-1]
    assert end.finish_reason == "error" and "transfer" in end.error
