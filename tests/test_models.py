"""Model tests: our llama-family model against transformers, for every loader.

- the embedded GGUF (SmolLM2-135M, Q4_1) in float32: prefill, decode, chunked prefill and mixed
  batches over a paged cache, logits against transformers' own GGUF loading;
- Hugging Face folders of tiny random Llama / Mistral / Qwen2 / Qwen3 / Llama-3.1-rope models;
- dummy presets: build and run, and the big presets' shapes (parameter counts).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests._models_fixtures import PagedSequences, one_torch_thread  # noqa: F401 (fixture)
from tidal.config import ModelConfig
from tidal.models import PRESETS, get_preset, kv_bytes_per_token, kv_cache_shape, load_model, param_count
from tidal.models.arch import ModelArch
from tidal.models.layers import rope_inv_freq
from tidal.models.source import embedded_gguf_path, resolve_model_source

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407,
          19712, 8182, 2, 198, 1, 4093, 198]  # a SmolLM2 chat prompt, 24 tokens


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float()  # [len, vocab]


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor, atol: float) -> None:
    diff = (ours - ref).abs().max().item()
    assert diff < atol, f"max abs logit diff {diff}"
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


# ---- the embedded GGUF model ----

@pytest.fixture(scope="module")
def embedded():
    return load_model(ModelConfig(model=None, dtype="float32"))


@pytest.fixture(scope="module")
def hf_embedded():
    """transformers' own reading of the same GGUF file (its dequantization and un-permutation)."""
    import functools

    import gguf
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = embedded_gguf_path()
    with pytest.MonkeyPatch.context() as patch:
        # Speed only: transformers parses the file twice and rebuilds gguf's (pure) tensor-name
        # table for every submodule; reuse one parse and one table.
        patch.setattr(gguf, "GGUFReader", functools.lru_cache(maxsize=1)(gguf.GGUFReader))
        patch.setattr(gguf, "get_tensor_name_map", functools.lru_cache(maxsize=4)(gguf.get_tensor_name_map))
        config = AutoConfig.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
        with no_init_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
    model.load_state_dict(tensors, strict=False)
    model.tie_weights()
    return model.eval()


def test_embedded_source_and_arch(embedded):
    assert resolve_model_source(None).name == "SmolLM2-135M-Instruct"
    assert embedded.name == "SmolLM2-135M-Instruct"
    arch = embedded.arch
    expected = get_preset("smollm2-135m")
    for field in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
                  "vocab_size", "rope_theta", "tie_word_embeddings", "max_position_embeddings", "bos_token_id"):
        assert getattr(arch, field) == getattr(expected, field), field
    assert embedded.max_model_len == 8192 and embedded.dtype == torch.float32


def test_embedded_gguf_prefill_and_decode_match_transformers(embedded, hf_embedded):
    seqs = PagedSequences(embedded.model, block_size=4)
    ours = seqs.step({}, {"a": PROMPT})["a"]  # [24, vocab]
    assert ours.dtype == torch.float32
    assert_logits_close(ours, hf_logits(hf_embedded, PROMPT), atol=1e-3)
    sequence = list(PROMPT)
    for _ in range(2):
        sequence.append(int(ours[-1].argmax() if ours.dim() == 2 else ours.argmax()))
        ours = seqs.step({"a": sequence[-1]}, {})["a"]  # [vocab]
        assert_logits_close(ours, hf_logits(hf_embedded, sequence)[-1], atol=1e-3)


def test_embedded_gguf_mixed_batches_and_chunked_prefill(embedded, hf_embedded):
    a, b, c = PROMPT, PROMPT[:5] + [28, 7018, 411, 407], [1, 4093, 198, 19556, 905]
    seqs = PagedSequences(embedded.model, block_size=4)
    out = seqs.step({}, {"a": a[:10], "b": b})
    assert_logits_close(out["a"], hf_logits(hf_embedded, a[:10]), atol=1e-3)
    assert_logits_close(out["b"], hf_logits(hf_embedded, b), atol=1e-3)
    # Decode b while a continues its prompt in a second chunk and c starts.
    b.append(int(out["b"][-1].argmax()))
    out = seqs.step({"b": b[-1]}, {"a": a[10:], "c": c})
    assert_logits_close(out["b"], hf_logits(hf_embedded, b)[-1], atol=1e-3)
    assert_logits_close(out["a"], hf_logits(hf_embedded, a)[10:], atol=1e-3)
    assert_logits_close(out["c"], hf_logits(hf_embedded, c), atol=1e-3)
    # Three decodes of different context lengths in one step.
    seqs_next = {"a": a + [int(out["a"][-1].argmax())], "b": b + [5356], "c": c + [int(out["c"][-1].argmax())]}
    out = seqs.step({name: s[-1] for name, s in seqs_next.items()}, {})
    for name, sequence in seqs_next.items():
        assert_logits_close(out[name], hf_logits(hf_embedded, sequence)[-1], atol=1e-3)


def test_embedded_gguf_bfloat16_close_to_float32(embedded):
    loaded = load_model(ModelConfig(dtype="bfloat16"))
    assert loaded.model.embed_tokens.dtype == torch.bfloat16 and loaded.dtype == torch.bfloat16
    logits = PagedSequences(loaded.model).step({}, {"a": PROMPT})["a"]
    reference = PagedSequences(embedded.model).step({}, {"a": PROMPT})["a"]
    assert logits.dtype == torch.float32
    # bfloat16 keeps ~3 significant digits; transformers in bfloat16 is ~1.2 off float32 here.
    assert (logits - reference).abs().max() < 2.5
    assert (logits.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.9


# ---- Hugging Face folders ----

def _tiny_hf_model(kind: str):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=96, vocab_size=512, max_position_embeddings=512, rms_norm_eps=1e-5,
                  bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    configs = {
        "llama": lambda: LlamaConfig(**common),
        "llama-tied": lambda: LlamaConfig(**{**common, "tie_word_embeddings": True}),
        "mistral": lambda: MistralConfig(**common, sliding_window=256),
        "qwen2": lambda: Qwen2Config(**common, rope_theta=1e6),
        "qwen3": lambda: Qwen3Config(**common, head_dim=32),  # head_dim != hidden / heads
        # Scaling starts at wavelength 64 / 4 here, so it shows within a short prompt.
        "llama3.1-rope": lambda: LlamaConfig(**common, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64, "rope_theta": 500000.0}),
    }
    config = configs[kind]()
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            # Random everything, biases and norms included, with activations kept O(1).
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1 + 0.2 * noise if "norm" in name else 0.15 * noise)
    return model


def _to_old_config_keys(folder: str) -> None:
    """Rewrite config.json as hub checkpoints spell it: rope_theta / rope_scaling, not rope_parameters."""
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        config = json.load(f)
    params = config.pop("rope_parameters")
    config["rope_theta"] = params.pop("rope_theta")
    config["rope_scaling"] = params if params.get("rope_type") != "default" else None
    with open(path, "w") as f:
        json.dump(config, f)


HF_KINDS = ["llama", "llama-tied", "mistral", "qwen2", "qwen3", "llama3.1-rope"]


@pytest.mark.parametrize("kind", HF_KINDS)
def test_hf_folder_matches_transformers(kind, tmp_path):
    reference = _tiny_hf_model(kind)
    # qwen2 goes sharded (index.json + several files); llama3.1-rope uses the old config keys.
    reference.save_pretrained(tmp_path, max_shard_size="100KB" if kind == "qwen2" else "50GB")
    if kind == "llama3.1-rope":
        _to_old_config_keys(str(tmp_path))
    if kind == "qwen2":
        assert os.path.isfile(tmp_path / "model.safetensors.index.json")

    loaded = load_model(ModelConfig(model=str(tmp_path), dtype="float32"))
    arch = loaded.arch
    assert arch.attention_bias == (kind == "qwen2") and arch.qk_norm == (kind == "qwen3")
    assert arch.tie_word_embeddings == (kind == "llama-tied")
    assert loaded.max_model_len == (256 if kind == "mistral" else 512)
    assert loaded.name == os.path.basename(tmp_path)
    torch.testing.assert_close(rope_inv_freq(arch), reference.model.rotary_emb.inv_freq.float())

    prompt = [1, 17, 300, 42, 7, 99, 511, 3, 250, 8, 64, 128, 5, 77, 400, 2, 9, 31, 200, 6]
    seqs = PagedSequences(loaded.model, block_size=4)
    ours = seqs.step({}, {"a": prompt})["a"]
    torch.testing.assert_close(ours, hf_logits(reference, prompt), atol=2e-4, rtol=2e-4)
    sequence = prompt + [int(ours[-1].argmax())]
    ours = seqs.step({"a": sequence[-1]}, {})["a"]
    torch.testing.assert_close(ours, hf_logits(reference, sequence)[-1], atol=2e-4, rtol=2e-4)


def test_hf_folder_errors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="unsupported architecture"):
        load_model(ModelConfig(model=str(tmp_path)))
    reference = _tiny_hf_model("llama")
    reference.save_pretrained(tmp_path / "ok")
    with pytest.raises(ValueError, match="max_model_len"):
        load_model(ModelConfig(model=str(tmp_path / "ok"), max_model_len=100_000))
    os.remove(tmp_path / "ok" / "model.safetensors")
    with pytest.raises(ValueError, match="safetensors"):
        load_model(ModelConfig(model=str(tmp_path / "ok")))


def test_unknown_models_raise_value_error(tmp_path):
    for model in ["/no/such/model", "dummy:no-such-preset", str(tmp_path)]:
        with pytest.raises(ValueError):
            load_model(ModelConfig(model=model))
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"nope")
    with pytest.raises(ValueError):
        load_model(ModelConfig(model=str(not_gguf)))


# ---- GGUF files of other architectures (written here from tiny HF models) ----

_GGUF_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
               "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}


def _llama_cpp_permute(weight, num_heads: int):
    """What llama.cpp's converter does to attn_q / attn_k rows of llama models."""
    return weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:]) \
        .swapaxes(1, 2).reshape(weight.shape)


def _write_gguf(model, path: str, architecture: str) -> None:
    """A GGUF file of `model` with llama.cpp's metadata keys and tensor names; weights in F16."""
    import gguf

    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer = gguf.GGUFWriter(path, architecture)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    if config.rope_parameters.get("rope_type") == "llama3":
        # llama.cpp keeps Llama 3.1's scaling as one divisor per frequency.
        base = 1.0 / config.rope_parameters["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim)
        writer.add_tensor("rope_freqs.weight", (base / model.model.rotary_emb.inv_freq).numpy())
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        array = tensor.numpy()
        if architecture == "llama" and (".q_proj." in name or ".k_proj." in name):
            heads = config.num_attention_heads if ".q_proj." in name else config.num_key_value_heads
            array = _llama_cpp_permute(array, heads)
        if array.ndim == 2:
            array = array.astype("float16")
        writer.add_tensor(_gguf_tensor_name(name), array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _gguf_tensor_name(name: str) -> str:
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if name in fixed:
        return fixed[name]
    _, _, layer, rest = name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_GGUF_NAMES[module]}.{kind}"


@pytest.mark.parametrize("kind, architecture", [("qwen2", "qwen2"), ("qwen3", "qwen3"),
                                                ("llama3.1-rope", "llama"), ("llama-tied", "llama")])
def test_gguf_architectures_match_transformers(kind, architecture, tmp_path):
    reference = _tiny_hf_model(kind)
    with torch.no_grad():  # the file holds matrices in float16: compare against those values
        for name, param in reference.named_parameters():
            if param.dim() == 2:
                param.copy_(param.half().float())
    path = str(tmp_path / f"{kind}.gguf")
    _write_gguf(reference, path, architecture)
    loaded = load_model(ModelConfig(model=path, dtype="float32"))
    assert loaded.name == kind and loaded.arch.architecture == architecture
    assert loaded.arch.tie_word_embeddings == (kind == "llama-tied")
    assert loaded.arch.head_dim == (32 if kind == "qwen3" else 16)
    torch.testing.assert_close(rope_inv_freq(loaded.arch), reference.model.rotary_emb.inv_freq.float())
    prompt = [1, 17, 300, 42, 7, 99, 511, 3, 250, 8, 64, 128, 5, 77]
    ours = PagedSequences(loaded.model, block_size=4).step({}, {"a": prompt})["a"]
    torch.testing.assert_close(ours, hf_logits(reference, prompt), atol=2e-4, rtol=2e-4)


# ---- dummy presets and shapes ----

@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen3"])
def test_dummy_preset_runs(preset):
    loaded = load_model(ModelConfig(model=f"dummy:{preset}", seed=3))
    assert loaded.name == preset and loaded.arch == PRESETS[preset]
    seqs = PagedSequences(loaded.model, block_size=4)
    logits = seqs.step({}, {"a": [1, 2, 3, 4, 5, 6]})["a"]
    assert logits.shape == (6, loaded.arch.vocab_size) and torch.isfinite(logits).all()
    logits = seqs.step({"a": 7}, {"b": [8, 9]})
    assert logits["a"].shape == (loaded.arch.vocab_size,)
    again = load_model(ModelConfig(model=f"dummy:{preset}", seed=3)).model
    assert torch.equal(again.layers[1].qkv_weight, loaded.model.layers[1].qkv_weight)


@pytest.mark.parametrize("preset, billions", [
    ("llama-3.1-8b", 8.03), ("llama-3.1-70b", 70.55), ("qwen3-8b", 8.19), ("qwen2.5-7b", 7.62),
    ("mistral-7b", 7.25), ("smollm2-135m", 0.1345)])
def test_preset_param_counts(preset, billions):
    assert param_count(get_preset(preset)) / 1e9 == pytest.approx(billions, rel=0.005)


def test_kv_sizes():
    arch = get_preset("llama-3.1-8b")
    assert kv_cache_shape(arch, 100, 16) == (8, 100, 16, 128)
    assert kv_bytes_per_token(arch, torch.bfloat16) == 2 * 32 * 8 * 128 * 2  # 128 KiB
    assert kv_bytes_per_token(get_preset("smollm2-135m"), torch.float32) == 2 * 30 * 3 * 64 * 4


def test_arch_validation():
    with pytest.raises(ValueError, match="rope"):
        ModelArch("llama", 64, 2, 4, 2, 16, 128, 512, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ValueError, match="multiple"):
        ModelArch("llama", 64, 2, 4, 3, 16, 128, 512)
