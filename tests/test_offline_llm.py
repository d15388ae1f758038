"""The offline `LLM` API on the embedded model: text, stop strings, eos handling."""

from __future__ import annotations

import pytest

from tidal import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32", num_kv_blocks=256)


def test_chat_answers_paris_and_stops_on_eos(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(max_tokens=40, temperature=0.0))
    completion = out.outputs[0]
    assert completion.text == "The capital of France is Paris."
    assert completion.finish_reason == "stop"
    assert completion.token_ids[-1] in llm.engine.eos_token_ids  # the eos id is kept, its text is not


def test_stop_string_truncates_text_and_tokens(llm):
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    full = llm.generate("The quick brown fox", params)[0].outputs[0]
    stop = full.text[len(full.text) // 2:][:6]
    assert stop.strip()
    cut = llm.generate("The quick brown fox", SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True,
                                                               stop=(stop,)))[0].outputs[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[:full.text.index(stop)]
    assert cut.token_ids == full.token_ids[:len(cut.token_ids)] and len(cut.token_ids) < len(full.token_ids)
    assert llm.engine.kv.num_used_blocks == 0  # the aborted request let go of its blocks


def test_sampling_can_be_kept_below_a_vocabulary_limit():
    """What a dummy model whose tokenizer is smaller than its vocabulary does (every sampled id decodes)."""
    llm = LLM("dummy:tiny-llama", num_kv_blocks=64)
    llm.engine.runner.sample_vocab_size = 100
    outs = llm.generate([list(range(5, 40))] * 2, [SamplingParams(max_tokens=12, ignore_eos=True),
                                                    SamplingParams(max_tokens=12, temperature=1.0, seed=3,
                                                                   ignore_eos=True)])
    assert all(t < 100 for o in outs for t in o.outputs[0].token_ids)
