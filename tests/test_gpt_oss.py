"""gpt-oss (`GptOssForCausalLM`) against Hugging Face transformers, on the CPU.

- YaRN: inverse frequencies and attention scaling equal transformers' (presets, `truncate` both ways);
- the expert MLP (router with bias, top-k then softmax, clamped SwiGLU over interleaved gate/up,
  expert biases) equals transformers' `GptOssMLP`, with activations large enough to hit the clamps;
- a tiny random `GptOssForCausalLM` (transformers' own class, eager attention: sinks, an 8-token
  window in alternate layers, YaRN, biases, 6 experts) saved in bfloat16 by `save_pretrained` and
  read by Tidal's HF loader: logits of a chunked prefill crossing the window and of decodes, and a
  check that dropping the window or the sinks would be caught; then through the engine (`LLM`,
  chunked prefill of a 40-token prompt, prefix-cache hits): the same greedy tokens and logprobs;
  a bfloat16 run close to it;
- config.json -> `ModelArch` (the hub's spelling), the presets' parameter counts (the model card's),
  tensor parallelism over 2 ranks (sinks split by head, biases counted once);
- `dummy:tiny-gpt-oss` generates past its window.
"""

from __future__ import annotations

import copy
import multiprocessing

import pytest
import torch

from tests._models_fixtures import PagedSequences, one_torch_thread  # noqa: F401 (fixture)
from _hf_greedy import assert_engine_greedy_matches
from tidal import LLM, SamplingParams
from tidal.config import ModelConfig
from tidal.models.arch import active_param_count, arch_from_hf_config, get_preset, param_count
from tidal.models.layers import rope_attention_scaling, rope_inv_freq
from tidal.models.llama import LlamaModel
from tidal.models.loader import load_model, resolve_max_model_len
from tidal.models.moe import SparseMoE
from tidal.parallel.sharding import TPShard

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

WINDOW = 8
NEW_TOKENS = 12
_YARN = {"rope_type": "yarn", "factor": 8.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
         "original_max_position_embeddings": 64}


def _tiny_config(**changes):
    config = {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
              "head_dim": 16, "intermediate_size": 32, "num_local_experts": 6, "num_experts_per_tok": 2,
              "vocab_size": 512, "sliding_window": WINDOW, "max_position_embeddings": 512, "rms_norm_eps": 1e-5,
              "bos_token_id": 1, "eos_token_id": 2, "rope_parameters": {**_YARN, "rope_theta": 10000.0},
              "attn_implementation": "eager"}
    return transformers.GptOssConfig(**{**config, **changes})


def _randomize(model, scale: float = 0.15) -> None:
    """Random everything (norms, router, biases, sinks included), rounded to bfloat16 so that the
    bf16 checkpoint holds exactly the float32 reference's weights."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            value = 1 + 0.2 * noise if "norm" in name else noise if "sinks" in name else scale * noise
            param.copy_(value.bfloat16().float())


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """(transformers model in float32, its folder saved in bfloat16, with a word-level tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    model = transformers.GptOssForCausalLM(_tiny_config()).float().eval()
    _randomize(model)
    folder = tmp_path_factory.mktemp("gpt-oss")
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(folder)
    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(512)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(folder / "tokenizer.json"))
    return model, folder


# ---- pieces ----

@pytest.mark.parametrize("preset", ["gpt-oss-20b", "tiny-gpt-oss"])
@pytest.mark.parametrize("truncate", [False, True])
def test_yarn_equals_transformers(preset, truncate):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    arch = get_preset(preset)
    arch = arch.replace(rope_scaling={**arch.rope_scaling, "truncate": truncate})
    config = _tiny_config(hidden_size=arch.hidden_size, num_attention_heads=arch.num_heads, head_dim=arch.head_dim,
                          max_position_embeddings=arch.max_position_embeddings,
                          rope_parameters={**arch.rope_scaling, "rope_theta": arch.rope_theta})
    inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS["yarn"](config)
    assert torch.equal(rope_inv_freq(arch), inv_freq)
    assert rope_attention_scaling(arch) == pytest.approx(attention_scaling, rel=1e-12)
    assert rope_attention_scaling(get_preset("gpt-oss-20b")) == pytest.approx(0.1 * torch.tensor(32.0).log().item() + 1)
    assert rope_attention_scaling(get_preset("llama-3.1-8b")) == 1.0


def test_experts_equal_transformers_mlp():
    """SparseMoE loaded from `GptOssMLP`'s tensors gives its output; inputs scaled so that gate and up
    values run past the clamps (±7)."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

    config = _tiny_config()
    reference = GptOssMLP(config).float()
    _randomize(reference, scale=0.5)
    arch = arch_from_hf_config({**config.to_dict(), "architectures": ["GptOssForCausalLM"]})
    moe = SparseMoE(arch, torch.float32, "cpu", TPShard())
    for name, tensor in reference.state_dict().items():
        slot = moe.weight_slot(f"mlp.{name}")
        with torch.no_grad():
            slot.target.copy_(tensor)
    assert sorted(f"mlp.{n}" for n in reference.state_dict()) == sorted(moe.weight_names())
    x = 3 * torch.randn(50, 64, generator=torch.Generator().manual_seed(1))
    gate_up = x @ reference.experts.gate_up_proj[0] + reference.experts.gate_up_proj_bias[0]
    assert gate_up.max() > 7 and gate_up.min() < -7, "the clamps are not exercised"
    with torch.no_grad():
        expected = reference(x[None])[0][0]
        torch.testing.assert_close(moe(x), expected, atol=1e-4, rtol=1e-4)


# ---- the whole model ----

def test_hf_folder_reads_the_gpt_oss_shape(hf_model):
    reference, folder = hf_model
    loaded = load_model(ModelConfig(model=str(folder), dtype="float32"))
    arch = loaded.arch
    assert arch.architecture == "gpt_oss" and arch.num_experts == 6 and arch.num_experts_per_tok == 2
    assert arch.layer_types == ("sliding_attention", "full_attention") * 2 and arch.sliding_window == WINDOW
    assert [arch.attention_window(i) for i in range(4)] == [WINDOW, None, WINDOW, None]
    assert arch.attention_sinks and arch.attention_bias and arch.o_bias and arch.moe_bias and not arch.qk_norm
    assert arch.rope_scaling["rope_type"] == "yarn" and arch.rope_theta == 10000.0
    assert param_count(arch) == reference.num_parameters()
    assert loaded.max_model_len == 512  # the window limits the sliding layers, not the context
    assert loaded.model.layers[0].sinks.dtype == torch.float32


def test_logits_match_transformers(hf_model):
    """A 40-token prompt in two chunks (the second after a cached prefix), then decodes; blocks of
    4 tokens, so the 8-token window starts mid-way through the cache."""
    reference, folder = hf_model
    loaded = load_model(ModelConfig(model=str(folder), dtype="float32"))
    prompt = [1] + [(37 * i) % 509 + 3 for i in range(39)]
    with torch.inference_mode():
        expected = reference(torch.tensor([prompt])).logits[0]
    seqs = PagedSequences(loaded.model, block_size=4)
    ours = torch.cat([seqs.step({}, {"a": prompt[:17]})["a"], seqs.step({}, {"a": prompt[17:]})["a"]])
    torch.testing.assert_close(ours, expected, atol=5e-5, rtol=5e-5)
    sequence = prompt
    for _ in range(3):
        sequence = sequence + [int(ours[-1].argmax())]
        with torch.inference_mode():
            expected = reference(torch.tensor([sequence])).logits[0, -1:]
        ours = seqs.step({"a": sequence[-1]}, {})["a"][None]
        torch.testing.assert_close(ours, expected, atol=5e-5, rtol=5e-5)
    # The window and the sinks matter here: without either, the logits move far past the tolerance.
    for change in ({"layer_types": ()}, {"attention_sinks": False}):
        model = LlamaModel(loaded.arch.replace(**change), torch.float32)
        model.load_state_dict(loaded.model.state_dict(), strict=False)  # all but the dropped sinks
        with torch.inference_mode():
            wrong = PagedSequences(model, block_size=4).step({}, {"a": prompt})["a"]
            right = reference(torch.tensor([prompt])).logits[0]
        assert float((wrong - right).abs().max()) > 1e-2, change


def test_bfloat16_logits_near_transformers(hf_model):
    """In bfloat16 a near-tie of router logits may flip an expert in some token (in Tidal and in
    transformers alike), so the check is typical error: Tidal's bf16 logits are as near the float32
    reference as transformers' own bf16 run of the same checkpoint."""
    reference, folder = hf_model
    prompt = [1] + [(53 * i) % 509 + 3 for i in range(29)]
    hf_bf16 = transformers.GptOssForCausalLM.from_pretrained(folder, dtype=torch.bfloat16,
                                                             attn_implementation="eager").eval()
    with torch.inference_mode():
        expected = reference(torch.tensor([prompt])).logits[0]
        theirs = hf_bf16(torch.tensor([prompt])).logits[0].float()
    loaded = load_model(ModelConfig(model=str(folder), dtype="bfloat16"))
    ours = PagedSequences(loaded.model, block_size=4).step({}, {"a": prompt})["a"]
    ours_error = (ours - expected).abs().amax(-1).median()
    theirs_error = (theirs - expected).abs().amax(-1).median()
    assert ours_error < 2 * theirs_error + 0.02, (ours_error, theirs_error)
    assert (ours.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.8


PROMPTS = [[1, 5, 9, 33, 200, 7], [1, 77, 3], list(range(3, 43)),
           [1, 5, 9, 33, 200, 7, 8, 9, 10, 11, 12, 13, 14]]


def test_engine_greedy_matches_transformers(hf_model):
    reference, folder = hf_model
    # Every prompt plus its tokens runs past the 8-token window.
    assert_engine_greedy_matches(reference, folder, PROMPTS, NEW_TOKENS)


# ---- config, presets ----

def _hub_config(num_layers: int, num_experts: int) -> dict:
    """config.json as openai/gpt-oss-20b and -120b publish it (MXFP4 `quantization_config` left out)."""
    return {"architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
            "eos_token_id": 200002, "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu",
            "hidden_size": 2880, "initial_context_length": 4096, "initializer_range": 0.02,
            "intermediate_size": 2880, "max_position_embeddings": 131072, "model_type": "gpt_oss",
            "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)],
            "num_attention_heads": 64, "num_experts_per_tok": 4, "num_hidden_layers": num_layers,
            "num_key_value_heads": 8, "num_local_experts": num_experts, "output_router_logits": False,
            "pad_token_id": 199999, "rms_norm_eps": 1e-05, "rope_theta": 150000, "router_aux_loss_coef": 0.9,
            "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "rope_type": "yarn",
                             "original_max_position_embeddings": 4096, "truncate": False},
            "sliding_window": 128, "swiglu_limit": 7.0, "tie_word_embeddings": False, "use_cache": True,
            "vocab_size": 201088}


@pytest.mark.parametrize("preset, num_layers, num_experts", [("gpt-oss-20b", 24, 32), ("gpt-oss-120b", 36, 128)])
def test_hub_config_gives_the_preset(preset, num_layers, num_experts):
    generation = {"bos_token_id": 199998, "eos_token_id": [200002, 199999, 200012], "pad_token_id": 199999}
    assert arch_from_hf_config(_hub_config(num_layers, num_experts), generation) == get_preset(preset)
    no_types = _hub_config(num_layers, num_experts)
    del no_types["layer_types"]  # transformers' default: sliding first, then alternating
    assert arch_from_hf_config(no_types, generation) == get_preset(preset)
    assert resolve_max_model_len(None, get_preset(preset)) == 131072


@pytest.mark.parametrize("preset, total_billions, active_billions", [
    ("gpt-oss-20b", 20.91, 3.61), ("gpt-oss-120b", 116.83, 5.13)])
def test_gpt_oss_preset_param_counts(preset, total_billions, active_billions):
    """The model card's figures. Its active count takes the unembedding, not the embedding table."""
    arch = get_preset(preset)
    assert param_count(arch) / 1e9 == pytest.approx(total_billions, abs=0.006)
    embedding = arch.vocab_size * arch.hidden_size
    assert (active_param_count(arch) - embedding) / 1e9 == pytest.approx(active_billions, abs=0.006)


def test_bad_layer_types_are_refused():
    arch = get_preset("tiny-gpt-oss")
    with pytest.raises(ValueError, match="layer_types names 3 layers"):
        arch.replace(layer_types=arch.layer_types[:3])
    with pytest.raises(ValueError, match="chunked_attention"):
        arch.replace(layer_types=("chunked_attention",) * 4)
    with pytest.raises(ValueError, match="sliding_window > 0"):
        arch.replace(sliding_window=None)
    # Old Mistral: a window without layer types caps the context instead.
    assert resolve_max_model_len(None, get_preset("mistral-7b").replace(sliding_window=4096)) == 4096


# ---- tensor parallelism: 2 ranks on the CPU ----

def _rank_main(rank: int, port: int, folder: str, results) -> None:
    from tidal.parallel.group import destroy_tensor_parallel, init_tensor_parallel

    torch.set_num_threads(1)
    try:
        init_tensor_parallel(rank, 2, f"tcp://127.0.0.1:{port}", "gloo")
        config = ModelConfig(model=folder, dtype="float32")
        sharded = PagedSequences(load_model(config, tp_rank=rank, tp_size=2).model, block_size=4)
        whole = PagedSequences(load_model(config).model, block_size=4)
        diffs = []
        for decodes, prefills in [({}, {"a": list(range(3, 25)), "b": [1, 500, 7]}), ({"a": 5, "b": 9}, {})]:
            ours, ref = sharded.step(decodes, prefills), whole.step(decodes, prefills)
            diffs.append(max(float((ours[n] - ref[n]).abs().max()) for n in ref))
        results.put((rank, diffs))
        destroy_tensor_parallel()
    except BaseException as exc:
        results.put((rank, repr(exc)))
        raise


def test_tp2_equals_unsharded(hf_model):
    from tidal.runtime.ports import free_port

    ctx = multiprocessing.get_context("spawn")
    results, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_rank_main, args=(rank, port, str(hf_model[1]), results)) for rank in range(2)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
    for rank in range(2):
        assert isinstance(got[rank], list), f"rank {rank} failed: {got[rank]}"
        assert max(got[rank]) < 1e-4, f"rank {rank} differs from unsharded by {got[rank]}"
    assert [p.exitcode for p in procs] == [0, 0]


# ---- dummy preset ----

def test_dummy_tiny_gpt_oss_generates():
    arch = get_preset("tiny-gpt-oss")
    assert arch.sliding_window == 16 and arch.attention_window(0) == 16 and arch.attention_window(1) is None
    with LLM("dummy:tiny-gpt-oss", num_kv_blocks=64, block_size=4, token_budget=16) as llm:
        out = llm.generate(["The quick brown fox jumps over the lazy dog. " * 3],
                           SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0]
        assert llm.engine.kv.num_used_blocks == 0
    assert len(out.outputs[0].token_ids) == 8 and len(out.prompt_token_ids) > arch.sliding_window

