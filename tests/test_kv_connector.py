"""The KV connector on its own: two block managers, the fake transfer, no model and no scheduler.

A prefill side holds a finished request's blocks; a decode side pulls them, reusing its own
cached prefix. Checked: which blocks are copied, what is released to whom, deferred aborts, hold
timeouts, refusals without a backend, and (every test's end) that no block is left in use.
"""

from __future__ import annotations

import time

import pytest
import torch

from tidal.engine.kv_cache.manager import KVCacheManager
from tidal.engine.kv_connector import KVConnector
from tidal.engine.request import Request
from tidal.protocol import AddRequest, KVLayout, SamplingParams
from tidal.transfer import KVTransferConfig
from tidal.transfer.base import layout_bytes_per_block
from tidal.transfer.fake import FakeKVTransfer

BLOCK, NUM_BLOCKS = 4, 16
LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, num_blocks=NUM_BLOCKS, block_size=BLOCK, head_dim=2, dtype="float32")
PROMPT = list(range(10, 20))  # 10 tokens: 3 blocks, 2 of them full


def _side(worker_id: str, **transfer) -> KVConnector:
    config = KVTransferConfig(backend="fake", **transfer)
    connector = KVConnector(KVCacheManager(NUM_BLOCKS, BLOCK), FakeKVTransfer(LAYOUT, torch.device("cpu"),
                                                                               worker_id, config))
    connector.release_addr = worker_id
    return connector


@pytest.fixture()
def sides():
    prefill, decode = _side("p"), _side("d")
    yield prefill, decode
    for side in (prefill, decode):
        side.close()
        assert side.kv.num_used_blocks == 0 and not side.kv.held and not side.pulls  # nothing leaks


def _request(request_id: str = "r", prompt=PROMPT) -> Request:
    return Request(request_id, prompt, SamplingParams(max_tokens=4), max_model_len=64)


def _held_prefill(prefill: KVConnector, request_id: str = "r"):
    """A finished remote prefill: its blocks filled with a marker and held; its params."""
    request = _request(request_id)
    assert prefill.kv.allocate_slots(request, request.num_tokens)
    block_ids = prefill.kv.hold(request)
    prefill.backend.cache[:, :, :, block_ids] = 7.0
    return prefill.held_params(request)


def _pull_to_end(decode: KVConnector, request: Request, params) -> list:
    decode.add_pull(request, params)
    return _ended(decode)


def _ended(decode: KVConnector) -> list:
    """Poll until a pull ends; the pulls that ended."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        ended = decode.advance_pulls()
        if ended:
            return ended
    raise AssertionError("the pull did not end")


def test_pull_copies_the_held_blocks_and_releases_them(sides):
    prefill, decode = sides
    params = _held_prefill(prefill)
    assert params.release_addr == "p" and len(params.block_ids) == 3 and "r" in prefill.held_until
    request = _request()
    (pulled,) = _pull_to_end(decode, request, params)
    assert pulled.request is request and pulled.error is None and not pulled.aborted
    assert request.num_computed_tokens == request.num_prompt_tokens
    dst = decode.kv.block_ids("r")
    assert bool((decode.backend.cache[:, :, :, dst] == 7.0).all())
    assert decode.take_releases() == [("p", "r")] and decode.take_releases() == []
    assert decode.transfers_total == 1 and decode.transfer_bytes_total > 0
    assert prefill.release("r") and not prefill.release("r") and not prefill.held_until
    decode.kv.free(request)


def test_a_cached_prefix_is_not_copied_again(sides):
    prefill, decode = sides
    first = _request("a")
    assert decode.kv.allocate_slots(first, first.num_tokens)  # the decode side computed this prompt before
    decode.kv.free(first)
    params = _held_prefill(prefill)
    request = _request()
    (pulled,) = _pull_to_end(decode, request, params)
    assert pulled.error is None and request.num_cached_tokens == 2 * BLOCK
    assert decode.prefix_hit_tokens_total == 2 * BLOCK
    assert decode.transfer_bytes_total == layout_bytes_per_block(LAYOUT)  # the third block only
    decode.kv.free(request)
    prefill.release("r")


def test_abort_before_the_pull_starts_releases_at_once_and_during_it_waits(sides):
    prefill, decode = sides
    params = _held_prefill(prefill)
    waiting = _request("w")
    decode.add_pull(waiting, params)
    assert decode.abort("w") is False  # not started: the engine ends it now
    assert decode.take_releases() == [("p", "w")] and not decode.pulls
    slow = _side("slow", debug_delay_s=0.05)
    try:
        request = _request()
        slow.add_pull(request, params)
        assert slow.advance_pulls() == [] and slow.pulls["r"].transfer is not None
        assert slow.abort("r") is True  # a copy may be writing: deferred
        assert slow.kv.num_used_blocks > 0
        (pulled,) = _ended(slow)
        assert pulled.aborted and pulled.error is None
        slow.kv.free(request)
        assert slow.take_releases() == [("p", "r")]
    finally:
        slow.close()
    prefill.release("r")


def test_a_failed_pull_ends_with_its_error(sides):
    prefill, decode = sides
    params = _held_prefill(prefill)
    decode.backend.fail_next = True
    request = _request()
    (pulled,) = _pull_to_end(decode, request, params)
    assert "injected failure" in pulled.error and decode.transfer_failures_total == 1
    decode.kv.free(request)
    prefill.release("r")


def test_an_unpulled_hold_expires(sides):
    prefill, _ = sides
    _held_prefill(prefill)
    prefill.held_until["r"] = time.monotonic() - 1
    prefill.expire_holds()
    assert not prefill.kv.held and not prefill.held_until


def test_without_a_backend_remote_prefills_and_pulls_are_refused(sides):
    prefill, _ = sides
    bare = KVConnector(KVCacheManager(NUM_BLOCKS, BLOCK))
    add = AddRequest(request_id="x", prompt_token_ids=PROMPT, sampling_params=SamplingParams(), hold_kv=True)
    assert "cannot serve remote prefills" in bare.check(add)
    params = _held_prefill(prefill, "x")
    pull = AddRequest(request_id="x", prompt_token_ids=PROMPT, sampling_params=SamplingParams(),
                      kv_transfer_params=params, output_token_ids=[1])
    assert "cannot pull KV" in bare.check(pull)
    assert prefill.check(pull) is None
    short = AddRequest(request_id="x", prompt_token_ids=PROMPT + [1, 2, 3], sampling_params=SamplingParams(),
                       kv_transfer_params=params, output_token_ids=[1])
    assert "do not cover the prompt" in prefill.check(short)
    prefill.release("x")
