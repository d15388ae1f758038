"""Mixture-of-experts models (Qwen3-MoE, Mixtral) against Hugging Face transformers, on the CPU.

- `moe_forward` (grouped by expert) equals a per-token loop over each token's top-k experts;
  renormalized top-k weights equal a softmax over the top-k logits (Mixtral's formulation);
- tiny random `Qwen3MoeForCausalLM` / `MixtralForCausalLM` (transformers' own classes, several
  experts, a dense layer among sparse ones) saved with `save_pretrained` and read by Tidal's HF
  loader: logits of a prefill and a decode over a paged cache; then through the engine (`LLM`,
  chunked prefill of a prompt longer than the token budget, prefix-cache hits): the same greedy
  tokens, and logprobs within float32 tolerance;
- config.json -> `ModelArch` (sparse layers, hub and transformers-5 key spellings), the presets'
  parameter counts, every expert expected by `check_loaded`;
- tensor parallelism: 2 ranks (gloo) holding each expert's half of the intermediate rows equal
  the unsharded model;
- `dummy:tiny-qwen3-moe` and `dummy:tiny-mixtral` generate, offline and through `tidal serve`.
"""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest
import torch

from tests._models_fixtures import PagedSequences, one_torch_thread  # noqa: F401 (fixture)
from _hf_greedy import assert_engine_greedy_matches
from tidal import LLM, SamplingParams
from tidal.config import ModelConfig
from tidal.models.arch import active_param_count, arch_from_hf_config, get_preset, param_count
from tidal.models.loader import load_model
from tidal.models.moe import moe_forward, select_experts

pytestmark = pytest.mark.usefixtures("one_torch_thread")

KINDS = ["qwen3_moe", "qwen3_moe-mixed", "mixtral"]
NEW_TOKENS = 12


# ---- the MoE block alone ----

def _per_token_reference(hidden, router_logits, w13, w2, top_k, renormalize):
    """The textbook definition, one token and one expert at a time."""
    out = torch.zeros_like(hidden)
    inter = w2.shape[2]
    for t in range(hidden.shape[0]):
        probs = router_logits[t].float().softmax(-1)
        weights, experts = probs.topk(top_k)
        if renormalize:
            weights = weights / weights.sum()
        for weight, e in zip(weights, experts.tolist()):
            gate, up = w13[e, :inter] @ hidden[t], w13[e, inter:] @ hidden[t]
            out[t] += weight * (w2[e] @ (torch.nn.functional.silu(gate) * up))
    return out


@pytest.mark.parametrize("num_tokens", [1, 5, 64])
@pytest.mark.parametrize("renormalize", [True, False])
def test_moe_forward_equals_a_per_token_loop(num_tokens, renormalize):
    g = torch.Generator().manual_seed(num_tokens)
    experts, hidden_size, inter, top_k = 8, 32, 24, 3
    hidden = torch.randn(num_tokens, hidden_size, generator=g)
    router_logits = torch.randn(num_tokens, experts, generator=g)
    w13 = torch.randn(experts, 2 * inter, hidden_size, generator=g) / hidden_size ** 0.5
    w2 = torch.randn(experts, hidden_size, inter, generator=g) / inter ** 0.5
    ours = moe_forward(hidden, router_logits, w13, w2, top_k, renormalize)
    torch.testing.assert_close(ours, _per_token_reference(hidden, router_logits, w13, w2, top_k, renormalize))


def test_renormalized_top_k_is_a_softmax_over_the_top_k_logits():
    logits = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    weights, experts = select_experts(logits, 2, renormalize=True)
    top_logits, top_experts = logits.topk(2, dim=-1)
    assert torch.equal(experts, top_experts)
    torch.testing.assert_close(weights, top_logits.softmax(-1))
    raw, _ = select_experts(logits, 2, renormalize=False)
    torch.testing.assert_close(raw, logits.softmax(-1).topk(2, dim=-1).values)


# ---- tiny random HF models ----

def _tiny_hf_moe(kind: str):
    transformers = pytest.importorskip("transformers")
    common = {"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
              "vocab_size": 512, "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "bos_token_id": 1,
              "eos_token_id": 2, "tie_word_embeddings": False, "num_experts_per_tok": 2}
    configs = {  # several experts, top-2, so routing decides the output
        "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
            **common, head_dim=32, intermediate_size=96, moe_intermediate_size=48, num_experts=8,
            norm_topk_prob=True),
        # Layer 1 dense (mlp_only_layers), weights not renormalized (transformers' default).
        "qwen3_moe-mixed": lambda: transformers.Qwen3MoeConfig(
            **common, head_dim=16, intermediate_size=96, moe_intermediate_size=32, num_experts=6,
            norm_topk_prob=False, mlp_only_layers=[1]),
        "mixtral": lambda: transformers.MixtralConfig(**common, intermediate_size=48, num_local_experts=6),
    }
    model = transformers.AutoModelForCausalLM.from_config(configs[kind](), dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            # Random everything, norms and router included, with activations kept O(1).
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1 + 0.2 * noise if "norm" in name else 0.15 * noise)
    return model


def _to_hub_keys(folder: Path) -> None:
    """config.json as hub checkpoints spell it: `num_experts` (not transformers 5's
    `num_local_experts`) for Qwen3-MoE, `rope_theta` (not `rope_parameters`)."""
    config = json.loads((folder / "config.json").read_text())
    config["num_experts"] = config.pop("num_local_experts")
    config["rope_theta"] = config.pop("rope_parameters")["rope_theta"]
    (folder / "config.json").write_text(json.dumps(config))


def _save_folder(model, folder: Path, kind: str) -> Path:
    """The model's HF folder (per-expert tensor names, as on the hub) and a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    model.save_pretrained(folder)
    if kind == "qwen3_moe":
        _to_hub_keys(folder)
    vocab = model.config.vocab_size
    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory) -> dict:
    """kind -> (transformers model, its saved folder), for every kind."""
    models = {kind: _tiny_hf_moe(kind) for kind in KINDS}
    return {kind: (model, _save_folder(model, tmp_path_factory.mktemp(kind), kind))
            for kind, model in models.items()}


@pytest.fixture(params=KINDS)
def hf_moe(request, hf_models):
    """(kind, transformers model, its saved folder)."""
    return (request.param, *hf_models[request.param])


def test_hf_folder_reads_the_moe_shape(hf_moe):
    kind, reference, folder = hf_moe
    config = reference.config
    loaded = load_model(ModelConfig(model=str(folder), dtype="float32"))
    arch = loaded.arch
    assert arch.architecture == kind.partition("-")[0]
    assert arch.num_experts == (config.num_experts if kind.startswith("qwen3") else config.num_local_experts)
    assert arch.num_experts_per_tok == 2 and arch.qk_norm == kind.startswith("qwen3")
    assert arch.norm_topk_prob == (kind != "qwen3_moe-mixed")
    assert [arch.is_sparse_layer(i) for i in range(3)] == [True, kind != "qwen3_moe-mixed", True]
    layers = loaded.model.layers
    assert layers[0].moe.w13.shape == (arch.num_experts, 2 * arch.moe_intermediate_size, 64)
    assert layers[0].moe.w2.shape == (arch.num_experts, 64, arch.moe_intermediate_size)
    assert (layers[1].moe is None) == (kind == "qwen3_moe-mixed")
    assert param_count(arch) == reference.num_parameters()


def test_hf_folder_logits_match_transformers(hf_moe):
    _, reference, folder = hf_moe
    loaded = load_model(ModelConfig(model=str(folder), dtype="float32"))
    prompt = [1, 17, 300, 42, 7, 99, 511, 3, 250, 8, 64, 128, 5, 77, 400, 2, 9, 31, 200, 6]
    seqs = PagedSequences(loaded.model, block_size=4)
    with torch.inference_mode():
        ref = reference(torch.tensor([prompt])).logits[0]
    ours = seqs.step({}, {"a": prompt})["a"]
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=2e-4)
    sequence = prompt + [int(ours[-1].argmax())]
    with torch.inference_mode():
        ref = reference(torch.tensor([sequence])).logits[0, -1]
    torch.testing.assert_close(seqs.step({"a": sequence[-1]}, {})["a"], ref, atol=2e-4, rtol=2e-4)


PROMPTS = [[1, 5, 9, 33, 200, 7], [1, 77, 3], list(range(3, 43)),
           [1, 5, 9, 33, 200, 7, 8, 9, 10, 11, 12, 13, 14]]


def test_engine_greedy_matches_transformers(hf_moe):
    _, reference, folder = hf_moe
    assert_engine_greedy_matches(reference, folder, PROMPTS, NEW_TOKENS)


# ---- shapes, names, presets ----

def test_qwen3_moe_config_picks_sparse_layers():
    config = {"architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 64, "num_hidden_layers": 6,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 96,
              "vocab_size": 100, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
              "decoder_sparse_step": 2, "mlp_only_layers": [3], "sliding_window": 64,
              "use_sliding_window": False}
    arch = arch_from_hf_config(config)
    # transformers: sparse where (i + 1) % step == 0 and i not in mlp_only_layers.
    assert [i for i in range(6) if arch.is_sparse_layer(i)] == [1, 5]
    assert arch.norm_topk_prob is False and arch.sliding_window is None
    dense = arch_from_hf_config({**config, "architectures": ["Qwen3ForCausalLM"]})
    assert dense.num_experts == 0 and not any(dense.is_sparse_layer(i) for i in range(6))
    mixtral = {**config, "architectures": ["MixtralForCausalLM"], "num_local_experts": 8}
    del mixtral["use_sliding_window"]  # Mixtral's config has no switch: a window is on
    mixtral = arch_from_hf_config(mixtral)
    assert mixtral.num_experts == 8 and mixtral.moe_intermediate_size == 96 and mixtral.sliding_window == 64
    assert all(mixtral.is_sparse_layer(i) for i in range(6)) and mixtral.norm_topk_prob


@pytest.mark.parametrize("preset, total_billions, active_billions", [
    ("qwen3-30b-a3b", 30.53, 3.35), ("mixtral-8x7b", 46.70, 12.88)])
def test_moe_preset_param_counts(preset, total_billions, active_billions):
    """The model cards' figures: Qwen3-30B-A3B 30.5B (3.3B activated), Mixtral 8x7B 46.7B (12.9B)."""
    arch = get_preset(preset)
    assert param_count(arch) / 1e9 == pytest.approx(total_billions, rel=0.002)
    assert active_param_count(arch) / 1e9 == pytest.approx(active_billions, rel=0.002)
    assert active_param_count(get_preset("llama-3.1-8b")) == param_count(get_preset("llama-3.1-8b"))


def test_every_expert_is_expected(tmp_path):
    from safetensors.torch import load_file, save_file

    reference = _tiny_hf_moe("mixtral")
    folder = _save_folder(reference, tmp_path / "m", "mixtral")
    names = load_model(ModelConfig(model="dummy:tiny-mixtral")).model.expected_weight_names()
    assert "model.layers.1.block_sparse_moe.experts.3.w3.weight" in names
    assert len([n for n in names if ".experts." in n]) == 2 * 4 * 3  # layers x experts x (w1, w2, w3)
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["model.layers.2.block_sparse_moe.experts.5.w2.weight"]
    save_file(tensors, str(folder / "model.safetensors"))
    missing = r"missing 1 weights: model\.layers\.2\.block_sparse_moe\.experts\.5\.w2"
    with pytest.raises(ValueError, match=missing):
        load_model(ModelConfig(model=str(folder), dtype="float32"))


def test_tensor_parallel_checks_the_experts_size():
    from tidal.models.llama import LlamaModel

    arch = get_preset("tiny-qwen3-moe")
    with pytest.raises(ValueError, match=r"does not divide this model's moe_intermediate_size \(31\)"):
        LlamaModel(arch.replace(moe_intermediate_size=31), tp_size=2)
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        arch.replace(num_experts_per_tok=9)


# ---- tensor parallelism: 2 ranks on the CPU ----

def _moe_rank_main(rank: int, port: int, folders: dict[str, str], results) -> None:
    from tidal.parallel.group import destroy_tensor_parallel, init_tensor_parallel

    torch.set_num_threads(1)
    try:
        init_tensor_parallel(rank, 2, f"tcp://127.0.0.1:{port}", "gloo")
        diffs = {}
        for kind, folder in folders.items():
            config = ModelConfig(model=folder, dtype="float32")
            sharded = PagedSequences(load_model(config, tp_rank=rank, tp_size=2).model, block_size=4)
            whole = PagedSequences(load_model(config).model, block_size=4)
            steps = [({}, {"a": list(range(3, 22)), "b": [1, 500, 7]}),
                     ({"a": 5, "b": 9}, {"c": [11, 12, 13]})]
            for i, (decodes, prefills) in enumerate(steps):
                ours, ref = sharded.step(decodes, prefills), whole.step(decodes, prefills)
                diffs[f"{kind} step {i}"] = max(float((ours[n] - ref[n]).abs().max()) for n in ref)
        dummy = load_model(ModelConfig(model="dummy:tiny-qwen3-moe"), tp_rank=rank, tp_size=2).model
        moe = dummy.layers[0].moe
        diffs["dummy shard shape"] = float(moe.w13.shape != (8, 32, 64) or moe.w2.shape != (8, 64, 16)
                                           or moe.gate_weight.shape != (8, 64))
        results.put((rank, diffs))
        destroy_tensor_parallel()
    except BaseException as exc:
        results.put((rank, repr(exc)))
        raise


def test_tp2_moe_equals_unsharded(hf_models):
    from tidal.runtime.ports import free_port

    folders = {kind: str(folder) for kind, (_, folder) in hf_models.items()}
    ctx = multiprocessing.get_context("spawn")
    results, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_moe_rank_main, args=(rank, port, folders, results)) for rank in range(2)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
    for rank in range(2):
        assert isinstance(got[rank], dict), f"rank {rank} failed: {got[rank]}"
        assert len(got[rank]) == 2 * len(KINDS) + 1
        for name, diff in got[rank].items():
            assert diff < 1e-4, f"rank {rank}: {name} differs from unsharded by {diff}"
    assert [p.exitcode for p in procs] == [0, 0]


# ---- dummy presets ----

@pytest.mark.parametrize("preset", ["tiny-qwen3-moe", "tiny-mixtral"])
def test_dummy_moe_preset_generates(preset):
    with LLM(f"dummy:{preset}", num_kv_blocks=64, block_size=4, token_budget=16) as llm:
        out = llm.generate(["The quick brown fox jumps over the lazy dog. " * 3],
                           SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 8 and len(out.prompt_token_ids) > 16


def test_tidal_serve_a_dummy_moe_model(tmp_path):
    from openai import OpenAI

    from tests._server import running_server

    with running_server(["dummy:tiny-qwen3-moe", "--num-threads", "1"], tmp_path / "serve.log") as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="none")
        reply = client.chat.completions.create(model="tiny-qwen3-moe", max_tokens=6,
                                               messages=[{"role": "user", "content": "Hello there"}])
        assert reply.usage.completion_tokens == 6 and reply.choices[0].finish_reason == "length"
        stream = client.completions.create(model="tiny-qwen3-moe", prompt="Once upon", max_tokens=5,
                                           stream=True)
        assert len([c for c in stream if c.choices and c.choices[0].text is not None]) >= 1
