"""Greedy output (fp32) equals Hugging Face transformers on the same GGUF weights, token for token.

Batched prompts of different lengths, with chunked prefill on and off and with prefix-cache hits.
A divergence is accepted only where the reference's own top-two logits at that step differ by
less than 1e-4 (a true tie); any other divergence fails.
"""

from __future__ import annotations

import os

import pytest
import torch

from tidal import LLM, SamplingParams
from tidal.models.source import embedded_gguf_path as embedded_model_path

NEW_TOKENS = 32
TIE = 1e-4

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "1, 2, 3, 4,",
    "The quick brown fox",
    "Explain in one paragraph why the sky is blue, and mention Rayleigh scattering by name, "
    "then give one everyday example of the same effect that a child could notice.",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Translate to French: I would like a cup of coffee, please.",
    "Once upon a time, in a small village between two mountains, there lived an old clockmaker who "
    "had never once left the valley. Every morning he opened his shop at seven, wound every clock on "
    "the walls, and waited. One winter day a stranger arrived carrying a broken pocket watch and",
]


@pytest.fixture(scope="module")
def hf_reference():
    transformers = pytest.importorskip("transformers")
    path = embedded_model_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
    model.eval()
    return model


@pytest.fixture(scope="module")
def prompt_ids():
    llm_tokenizer = __import__("tidal.tokenizer", fromlist=["load_tokenizer"]).load_tokenizer(None)
    chat = [llm_tokenizer.encode(llm_tokenizer.apply_chat_template(
        [{"role": "user", "content": p}], add_generation_prompt=True), add_special_tokens=False)
        for p in PROMPTS[:4]]
    raw = [llm_tokenizer.encode(p) for p in PROMPTS[4:]]
    return chat + raw


@pytest.fixture(scope="module")
def reference_outputs(hf_reference, prompt_ids):
    """Per prompt: greedy tokens and each step's raw logits, from unbatched HF generation."""
    hf_reference.generation_config.eos_token_id = None  # as ignore_eos: always 32 tokens
    outputs = []
    with torch.no_grad():
        for ids in prompt_ids:
            gen = hf_reference.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                        do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=0,
                                        output_logits=True, return_dict_in_generate=True)
            tokens = gen.sequences[0, len(ids):].tolist()
            outputs.append((tokens, [step[0].float() for step in gen.logits]))
    return outputs


def assert_matches_reference(got: list[int], ref_tokens: list[int], ref_logits: list[torch.Tensor]) -> None:
    assert len(got) == len(ref_tokens)
    for step, (a, b) in enumerate(zip(got, ref_tokens)):
        if a != b:
            top2 = ref_logits[step].topk(2).values
            gap = float(top2[0] - top2[1])
            assert gap < TIE, f"diverged at step {step}: got {a}, reference {b}, reference top-2 gap {gap:.2e}"
            return  # a true tie: later tokens follow different histories


def _generate(llm: LLM, prompt_ids):
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    return llm.generate(prompt_ids, params)


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "whole-prompt"])
def test_greedy_matches_transformers(chunked, prompt_ids, reference_outputs):
    # A small budget forces long prompts into several chunks that share steps with decodes.
    llm = LLM(dtype="float32", token_budget=48 if chunked else 4096, enable_chunked_prefill=chunked,
              num_kv_blocks=512)
    cold = _generate(llm, prompt_ids)
    for out, (ref_tokens, ref_logits) in zip(cold, reference_outputs):
        assert_matches_reference(out.outputs[0].token_ids, ref_tokens, ref_logits)
    # Same prompts again: full blocks now come from the prefix cache.
    warm = _generate(llm, prompt_ids)
    # (The chat prompts share a system prompt, so even the cold run has some hits.)
    assert sum(o.num_cached_tokens for o in warm) > sum(o.num_cached_tokens for o in cold)
    for out, (ref_tokens, ref_logits) in zip(warm, reference_outputs):
        assert_matches_reference(out.outputs[0].token_ids, ref_tokens, ref_logits)
    free, cached, used = llm.engine.kv.pool.counts()
    assert used == 0
