"""The engine on each available device: paged, batched, chunked decoding equals full recompute.

The reference recomputes every sequence from scratch at each step through the model's own
whole-prompt path (one causal prefill span, no cache reuse), so the paged decode path, block
tables, slot mapping, chunking and sampling are all checked against an independent route.
Runs on the CPU always and on CUDA when present (marker `gpu`).
"""

from __future__ import annotations

import pytest
import torch

from tidal import LLM, SamplingParams
from tidal.kernels.paged_attention import AttentionMetadata, PrefillSpan
from tidal.models.llama import kv_cache_shape

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]


@torch.inference_mode()
def recompute_greedy(model, prompt: list[int], num_new: int) -> list[int]:
    tokens = list(prompt)
    device = model.device
    for _ in range(num_new):
        n = len(tokens)
        block_size = 16
        num_blocks = -(-n // block_size)
        shape = kv_cache_shape(model.arch, num_blocks, block_size)
        caches = [(torch.zeros(shape, dtype=model.dtype, device=device),
                   torch.zeros(shape, dtype=model.dtype, device=device)) for _ in range(model.arch.num_layers)]
        meta = AttentionMetadata(slot_mapping=torch.arange(n, device=device),
                                 prefills=[PrefillSpan(0, n, n, torch.arange(num_blocks, device=device))])
        hidden = model(torch.tensor(tokens, device=device), torch.arange(n, device=device), caches, meta)
        tokens.append(int(model.compute_logits(hidden[-1:]).argmax(-1)))
    return tokens[len(prompt):]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen3"])
def test_paged_engine_matches_recompute(device, preset):
    llm = LLM(f"dummy:{preset}", device=device, dtype="float32", token_budget=40, num_kv_blocks=64,
              block_size=16)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 40000, (n,), generator=g).tolist() for n in (5, 17, 33, 70, 100)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    model = llm.engine.runner.model
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == recompute_greedy(model, prompt, 12)
    assert llm.engine.kv.num_used_blocks == 0


@pytest.mark.parametrize("device", DEVICES)
def test_sampling_seeded_and_bounded(device):
    llm = LLM("dummy:tiny-llama", device=device, dtype="float32", num_kv_blocks=64)
    prompt = list(range(10, 30))
    params = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, top_k=50, seed=123, ignore_eos=True)
    first = llm.generate([prompt], params)[0].outputs[0].token_ids
    # Same seed, different batch-mates: same tokens.
    again = llm.generate([prompt, list(range(50, 90))], [params, SamplingParams(max_tokens=5, temperature=1.0)])
    assert again[0].outputs[0].token_ids == first
    top1 = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=1.0, top_k=1, ignore_eos=True))
    greedy = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    assert top1[0].outputs[0].token_ids == greedy[0].outputs[0].token_ids
    lp = llm.generate([prompt], SamplingParams(max_tokens=4, temperature=0.0, logprobs=3, ignore_eos=True))[0]
    assert len(lp.outputs[0].logprobs) == 4
    for token_id, entry in zip(lp.outputs[0].token_ids, lp.outputs[0].logprobs):
        assert entry.token_id == token_id and entry.top[0][0] == token_id and len(entry.top) == 3
        assert entry.logprob <= 0 and abs(entry.logprob - entry.top[0][1]) < 1e-5
