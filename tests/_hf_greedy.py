"""Greedy generation of a tiny transformers model against Tidal's engine on the same folder: the
tokens must be the same and their logprobs agree, with chunked prefill (a 16-token budget) and a
second pass whose full blocks come from the prefix cache (test_moe_models, test_gpt_oss,
test_gpt_oss_folder)."""

from __future__ import annotations

from pathlib import Path

import torch

from tidal import LLM, SamplingParams


def hf_greedy(model, ids: list[int], new_tokens: int, pad_token_id: int = 0) -> tuple[list[int], list[float]]:
    """Greedy tokens and each one's logprob, from unbatched transformers generation (eos ignored)."""
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        gen = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=new_tokens, pad_token_id=pad_token_id,
                             output_logits=True, return_dict_in_generate=True)
    tokens = gen.sequences[0, len(ids):].tolist()
    return tokens, [float(step[0].float().log_softmax(-1)[t]) for step, t in zip(gen.logits, tokens)]


def assert_engine_greedy_matches(reference, folder: Path, prompts: list[list[int]], new_tokens: int,
                                 pad_token_id: int = 0, tolerance: float = 1e-4) -> None:
    """Tidal's greedy tokens on `folder` equal transformers' (`reference`), cold and from the prefix
    cache, logprobs within `tolerance`, and no KV block is left in use."""
    expected = [hf_greedy(reference, ids, new_tokens, pad_token_id) for ids in prompts]
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True, logprobs=1)
    # A 16-token budget splits long prompts into chunks that share steps with decodes.
    with LLM(str(folder), dtype="float32", token_budget=16, enable_chunked_prefill=True,
             enable_prefix_caching=True, block_size=4, num_kv_blocks=128) as llm:
        cold = llm.generate(prompts, params)
        warm = llm.generate(prompts, params)  # full blocks now come from the prefix cache
        assert sum(o.num_cached_tokens for o in warm) > sum(o.num_cached_tokens for o in cold)
        for outputs in (cold, warm):
            for out, (tokens, logprobs) in zip(outputs, expected):
                assert out.outputs[0].token_ids == tokens
                ours = [lp.logprob for lp in out.outputs[0].logprobs]
                assert max(abs(a - b) for a, b in zip(ours, logprobs)) < tolerance
        assert llm.engine.kv.num_used_blocks == 0
