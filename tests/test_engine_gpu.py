"""The GPU engine (bf16, Triton kernels, CUDA graphs) against the float32 CPU engine, same weights.

Weights are drawn once on the CPU with a 1/sqrt(fan_in) scale (so logits are peaked and greedy
choices are not coin flips), then copied into both engines. Greedy tokens must agree for 32 steps
except at a true tie (the CPU's margin between the two tokens is within the GPU's measured error on
those logits); the logits of a whole
sequence must agree within bf16 tolerance. Marker `gpu`: skipped without a CUDA device.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tidal import LLM, SamplingParams
from tidal.engine.batch import StepBatch

pytestmark = pytest.mark.gpu

BF16_REL = 0.02  # a margin this small (relative to the logit) is a tie at bf16 precision
EMBED_SCALE = 8.0  # tied embeddings this large make logits of spread ~8: few near-ties to excuse


def _random_weights(model, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for name, p in model.named_parameters():
        if p.dim() == 1 or name.endswith("qk_norm"):
            weights[name] = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
        elif name in ("embed_tokens", "lm_head"):  # the input side is normalized by the first norm
            weights[name] = EMBED_SCALE * torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5
        else:
            weights[name] = torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5
    return weights


def _engines(preset: str) -> tuple[LLM, LLM]:
    cpu = LLM(f"dummy:{preset}", device="cpu", dtype="float32", num_kv_blocks=512, token_budget=512)
    gpu = LLM(f"dummy:{preset}", device="cuda", dtype="bfloat16", num_kv_blocks=512, token_budget=512,
              max_num_seqs=32)
    weights = _random_weights(cpu.engine.runner.model)
    with torch.no_grad():
        for llm in (cpu, gpu):
            for name, p in llm.engine.runner.model.named_parameters():
                p.copy_(weights[name])  # in place: the captured graphs keep pointing at them
    return cpu, gpu


def _whole_sequence_logits(llm: LLM, tokens: list[int]) -> torch.Tensor:
    """Logits at every position of `tokens`, one prefill through the engine's own attention path."""
    runner = llm.engine.runner
    n, bs = len(tokens), runner.block_size
    num_blocks = -(-n // bs)
    i32 = lambda x: np.asarray(x, dtype=np.int32)  # noqa: E731
    batch = StepBatch(input_ids=i32(tokens), positions=i32(range(n)), slot_mapping=i32(range(n)),
                      decode_context_lens=i32([]), decode_block_tables=np.zeros((0, 0), np.int32),
                      prefill_cu_query_lens=i32([0, n]), prefill_context_lens=i32([n]),
                      prefill_block_tables=i32([list(range(num_blocks))]), logits_rows=i32(range(n)))
    with torch.inference_mode():
        return runner.forward(batch).float().cpu()


@pytest.mark.parametrize("preset", ["small-llama", "small-qwen3"])
def test_gpu_bf16_matches_cpu_fp32(preset):
    cpu, gpu = _engines(preset)
    assert gpu.engine.runner.backend == "triton" and gpu.engine.runner.graphs is not None
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 40000, (n,), generator=g).tolist() for n in (7, 40, 129, 300)]
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    cpu_out = [o.outputs[0].token_ids for o in cpu.generate(prompts, params)]
    gpu_out = [o.outputs[0].token_ids for o in gpu.generate(prompts, params)]
    compared = 0
    for prompt, want, got in zip(prompts, cpu_out, gpu_out):
        cpu_logits = _whole_sequence_logits(cpu, prompt + want)
        gpu_logits = _whole_sequence_logits(gpu, prompt + want)  # the same tokens, teacher-forced
        for i, (a, b) in enumerate(zip(want, got)):
            if a != b:
                # Allowed only at a true tie: the CPU's margin for its token is within the GPU's own
                # measured error on those two logits. After it the sequences differ, so stop.
                row = len(prompt) + i - 1
                margin = float(cpu_logits[row, a] - cpu_logits[row, b])
                error = float((gpu_logits[row, [a, b]] - cpu_logits[row, [a, b]]).abs().sum())
                # bf16 keeps 8 bits: logits of size ~30 carry errors of a few tenths along a decode path
                # that differs from the teacher-forced one, hence the relative allowance.
                allowance = 2 * error + BF16_REL * float(cpu_logits[row, a].abs())
                assert margin <= allowance, (preset, i, margin, error, float(cpu_logits[row, a]))
                break
            compared += 1
    assert compared >= 0.25 * 32 * len(prompts)  # bf16 and fp32 part at the first tie; none come early
    # Whole-sequence logits (prefill kernel, GPU) against float32 on the CPU.
    tokens = prompts[2] + cpu_out[2]
    want, got = _whole_sequence_logits(cpu, tokens), _whole_sequence_logits(gpu, tokens)
    assert torch.isfinite(got).all()
    rel = float((got - want).norm() / want.norm())
    assert rel < 3e-2, rel
    assert gpu.engine.kv.num_used_blocks == 0


def test_gpu_chunked_prefill_and_mixed_steps_match_one_shot():
    """Chunked prefill (small token budget) mixes prefill chunks with graph-less decode steps:
    greedy output equals the same engine with a budget that prefills each prompt whole."""
    _, whole = _engines("small-llama")
    chunked = LLM("dummy:small-llama", device="cuda", dtype="bfloat16", num_kv_blocks=512, token_budget=48,
                  max_num_seqs=32)
    with torch.no_grad():
        for (_, p), (_, q) in zip(chunked.engine.runner.model.named_parameters(),
                                  whole.engine.runner.model.named_parameters()):
            p.copy_(q)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 40000, (n,), generator=g).tolist() for n in (5, 100, 250)]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    a = [o.outputs[0].token_ids for o in whole.generate(prompts, params)]
    b = [o.outputs[0].token_ids for o in chunked.generate(prompts, params)]
    agree = sum(x == y for x, y in zip(sum(a, []), sum(b, [])))
    assert agree >= 0.9 * len(sum(a, [])), (a, b)
    assert chunked.engine.kv.num_used_blocks == 0
