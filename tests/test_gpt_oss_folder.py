"""A gpt-oss folder in the release's own format loads and chats: proven on tiny random weights.

The folder is laid out as openai/gpt-oss-20b and -120b publish theirs: config.json with
`quantization_config` {"quant_method": "mxfp4", "modules_to_not_convert": [attention, router,
embeddings, lm_head]}, the experts as MXFP4 `*_blocks` [E, R, K/32, 16] / `*_scales` [E, R, K/32]
(quantized by `tidal.models.mxfp4.quantize_mxfp4` from a tiny random transformers
`GptOssForCausalLM`), everything else bf16, in two shards with an index; a harmony tokenizer
(tokenizer.json, tokenizer_config.json, chat_template.jinja) and generation_config.json with
the release's three stop tokens (<|return|>, <|endoftext|>, <|call|>). Then:

- Tidal's loader reads it, and its logits (a chunked prefill crossing the 8-token window, then
  decodes) equal transformers' run of the same folder through transformers' own MXFP4 dequantize
  path; the greedy tokens and logprobs through the engine (`LLM`, chunked prefill in a 16-token budget,
  prefix-cache hits) equal transformers' `generate`;
- `tidal serve FOLDER` (the real server, a subprocess) answers the official `openai` client, streaming
  and not, with the prompt the folder's harmony template renders (reasoning_effort, tools), and stops
  at <|return|> and <|call|> but not at <|end|> (forced with logit_bias);
- the app `tidal serve` builds over the folder's tokenizer reads a harmony reply (scripted: random
  weights can't be made to write one) into reasoning_content + content, and a tool call, with no
  parser configured.
"""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest
import torch
from _harmony_tokenizer import ANSWER, CALL, HARMONY_TEMPLATE, THINK, THOUGHT, harmony_backend
from _server import running_server
from safetensors.torch import save_file

from tests._models_fixtures import PagedSequences, one_torch_thread  # noqa: F401 (fixture)
from _hf_greedy import assert_engine_greedy_matches
from tidal.config import ModelConfig
from tidal.models.hf_loader import check_not_quantized, quantization_method
from tidal.models.loader import load_model
from tidal.models.mxfp4 import experts_from_mxfp4, quantize_mxfp4
from tidal.tokenizer import Tokenizer, load_tokenizer

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

WINDOW = 8
NEW_TOKENS = 12
SERVED = "gpt-oss-tiny"
MODULES_TO_NOT_CONVERT = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]
EXPERT_WEIGHTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def _config(tokenizer) -> dict:
    """Hidden 64, intermediate 96: no expert weight is square, so a transposed layout can't load."""
    ids = {name: tokenizer.token_to_id(name) for name in ("<|startoftext|>", "<|return|>", "<|endoftext|>")}
    return {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 16, "intermediate_size": 96, "num_local_experts": 6, "num_experts_per_tok": 2,
            "vocab_size": 512, "sliding_window": WINDOW, "max_position_embeddings": 512, "rms_norm_eps": 1e-5,
            "bos_token_id": ids["<|startoftext|>"], "eos_token_id": ids["<|return|>"],
            "pad_token_id": ids["<|endoftext|>"], "attn_implementation": "eager",
            "rope_parameters": {"rope_type": "yarn", "factor": 8.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                "truncate": False, "original_max_position_embeddings": 64, "rope_theta": 10000.0}}


def _random_model(config: dict):
    model = transformers.GptOssForCausalLM(transformers.GptOssConfig(**config)).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            value = 1 + 0.2 * noise if "norm" in name else noise if "sinks" in name else 0.15 * noise
            param.copy_(value.bfloat16().float())
    return model


def _release_tensors(model) -> dict[str, torch.Tensor]:
    """The state dict as the release stores it: experts [E, in, out] -> MXFP4 pairs over [E, out, in]."""
    tensors = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.to(torch.bfloat16)
        if name.endswith(EXPERT_WEIGHTS):
            tensors[name + "_blocks"], tensors[name + "_scales"] = quantize_mxfp4(tensor.transpose(1, 2))
        else:
            tensors[name] = tensor.contiguous()
    return tensors


def _write_shards(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Two shards (layers 0-1 and the rest) and model.safetensors.index.json, as the hub has them."""
    shards: dict[str, dict[str, torch.Tensor]] = {"model-00000-of-00001.safetensors": {},
                                                  "model-00001-of-00001.safetensors": {}}
    for name, tensor in tensors.items():
        first = name.startswith(("model.layers.0.", "model.layers.1.", "model.embed_tokens"))
        shards[sorted(shards)[0 if first else 1]][name] = tensor
    for file, part in shards.items():
        save_file(part, str(folder / file), metadata={"format": "pt"})
    weight_map = {name: file for file, part in shards.items() for name in part}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _write_tokenizer(folder: Path, backend) -> None:
    backend.save(str(folder / "tokenizer.json"))
    (folder / "chat_template.jinja").write_text(HARMONY_TEMPLATE)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|return|>", "pad_token": "<|endoftext|>",
        "model_max_length": 512, "tokenizer_class": "PreTrainedTokenizerFast"}))
    stops = [backend.token_to_id(name) for name in ("<|return|>", "<|endoftext|>", "<|call|>")]
    (folder / "generation_config.json").write_text(json.dumps({
        "bos_token_id": backend.token_to_id("<|startoftext|>"), "eos_token_id": stops,
        "pad_token_id": backend.token_to_id("<|endoftext|>"), "do_sample": True}))


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """(the tiny gpt-oss folder, transformers' model read from it with MXFP4 dequantized, in float32)."""
    backend = harmony_backend()
    folder = tmp_path_factory.mktemp("gpt-oss-release")
    config = _config(backend)
    model = _random_model(config)
    _write_shards(folder, _release_tensors(model))
    hub_config = {**model.config.to_dict(), "architectures": ["GptOssForCausalLM"], "torch_dtype": "bfloat16",
                  "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": MODULES_TO_NOT_CONVERT}}
    hub_config.pop("_attn_implementation", None)
    (folder / "config.json").write_text(json.dumps(hub_config))
    _write_tokenizer(folder, backend)
    reference = transformers.GptOssForCausalLM.from_pretrained(
        folder, quantization_config=transformers.Mxfp4Config(dequantize=True), dtype=torch.float32,
        attn_implementation="eager").eval()
    return folder, reference, model


# ---- the folder ----

def test_the_folder_is_in_the_release_format(release):
    folder, reference, original = release
    check_not_quantized(str(folder))
    assert quantization_method(str(folder)) == "mxfp4"
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert not [name for name in index if name.endswith(EXPERT_WEIGHTS)]  # no bf16 experts
    from safetensors import safe_open

    with safe_open(str(folder / index["model.layers.2.mlp.experts.gate_up_proj_blocks"]), "pt") as f:
        blocks, scales = (f.get_tensor(f"model.layers.2.mlp.experts.gate_up_proj{s}") for s in ("_blocks", "_scales"))
        assert f.get_tensor("model.layers.2.self_attn.q_proj.weight").dtype == torch.bfloat16
    assert blocks.dtype == scales.dtype == torch.uint8
    assert blocks.shape == (6, 2 * 96, 64 // 32, 16) and scales.shape == (6, 2 * 96, 64 // 32)  # [E, 2I, H/32, 16]
    # transformers dequantized them as Tidal does, and they really are quantized: off the bf16 originals
    theirs = reference.model.layers[2].mlp.experts.gate_up_proj.detach()
    assert torch.equal(experts_from_mxfp4(blocks, scales).float(), theirs)
    original_weight = original.model.layers[2].mlp.experts.gate_up_proj.detach()
    assert 0.02 < float((theirs - original_weight).norm() / original_weight.norm()) < 0.2


def test_the_folder_tokenizer_stops_at_return_and_call_not_end(release):
    folder = release[0]
    tokenizer = load_tokenizer(str(folder))
    ids = {name: tokenizer.backend.token_to_id(name) for name in ("<|return|>", "<|call|>", "<|endoftext|>", "<|end|>")}
    assert tokenizer.eos_token_ids == {ids["<|return|>"], ids["<|call|>"], ids["<|endoftext|>"]}
    assert tokenizer.chat_template == HARMONY_TEMPLATE


# ---- against transformers' own MXFP4 dequantization ----

def test_logits_match_transformers_dequantized(release):
    folder, reference, original = release
    loaded = load_model(ModelConfig(model=str(folder), dtype="float32"))
    assert loaded.arch.architecture == "gpt_oss" and loaded.arch.attention_window(0) == WINDOW
    prompt = [10] + [(37 * i) % 500 + 9 for i in range(39)]
    with torch.inference_mode():
        expected = reference(torch.tensor([prompt])).logits[0]
        unquantized = original(torch.tensor([prompt])).logits[0]
    seqs = PagedSequences(loaded.model, block_size=4)
    ours = torch.cat([seqs.step({}, {"a": prompt[:17]})["a"], seqs.step({}, {"a": prompt[17:]})["a"]])
    torch.testing.assert_close(ours, expected, atol=5e-5, rtol=5e-5)
    # the MXFP4 rounding shows: a loader that read the experts some other way would not pass above
    assert float((unquantized - expected).abs().max()) > 1e-2
    sequence = prompt
    for _ in range(3):
        sequence = sequence + [int(ours[-1].argmax())]
        with torch.inference_mode():
            expected = reference(torch.tensor([sequence])).logits[0, -1:]
        ours = seqs.step({"a": sequence[-1]}, {})["a"][None]
        torch.testing.assert_close(ours, expected, atol=5e-5, rtol=5e-5)


PROMPTS = [[10, 15, 19, 43, 210, 17], [10, 87, 13], list(range(13, 53)),
           [10, 15, 19, 43, 210, 17, 18, 19, 20, 21, 22, 23, 24]]


def test_engine_greedy_matches_transformers_dequantized(release):
    folder, reference, _ = release
    assert_engine_greedy_matches(reference, folder, PROMPTS, NEW_TOKENS, pad_token_id=1)


# ---- `tidal serve FOLDER` ----

@pytest.fixture(scope="module")
def client(release, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    args = [str(release[0]), "--dtype", "float32", "--served-model-name", SERVED, "--num-threads", "1",
            "--num-kv-blocks", "256", "--block-size", "4"]
    with running_server(args, log) as url, openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0,
                                                          timeout=120) as c:
        yield c


def _prompt_tokens(folder: Path, **render) -> int:
    tokenizer = load_tokenizer(str(folder))
    return len(tokenizer.encode(tokenizer.apply_chat_template(ASK, **render), add_special_tokens=False))


def test_serve_answers_with_the_folders_template(release, client):
    folder = release[0]
    assert [m.id for m in client.models.list().data] == [SERVED]
    reply = client.chat.completions.create(model=SERVED, messages=ASK, max_tokens=8, temperature=0,
                                           reasoning_effort="high")
    assert reply.usage.prompt_tokens == _prompt_tokens(folder, reasoning_effort="high")
    assert reply.usage.prompt_tokens != _prompt_tokens(folder, reasoning_effort="a little bit longer")
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens <= 8
    chunks = list(client.chat.completions.create(model=SERVED, messages=ASK, max_tokens=8, temperature=0,
                                                 reasoning_effort="high", stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == (reply.choices[0].message.content or "")
    with_tools = client.chat.completions.create(model=SERVED, messages=ASK, max_tokens=2, temperature=0,
                                                tools=[WEATHER])
    assert with_tools.usage.prompt_tokens == _prompt_tokens(folder, tools=[WEATHER])


@pytest.mark.parametrize("token, stops", [("<|return|>", True), ("<|call|>", True), ("<|end|>", False)])
def test_serve_stops_at_return_and_call_not_at_end(release, client, token, stops):
    token_id = load_tokenizer(str(release[0])).backend.token_to_id(token)
    reply = client.chat.completions.create(model=SERVED, messages=ASK, max_tokens=4, temperature=0,
                                           logit_bias={str(token_id): 100})
    if stops:
        assert reply.choices[0].finish_reason in ("stop", "tool_calls") and reply.usage.completion_tokens == 1
    else:  # <|end|> closes one message of a harmony reply (the reasoning), not the reply
        assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 4


# ---- the harmony reply, over the folder's tokenizer ----

@pytest.mark.parametrize("stream", [False, True])
async def test_a_harmony_reply_over_the_folders_tokenizer(release, stream):
    from test_frontend_unit import ScriptedEngine
    from test_tool_calls import ask, calls_of, openai_client

    tokenizer: Tokenizer = load_tokenizer(str(release[0]))
    engine = ScriptedEngine(tokenizer=tokenizer, max_model_len=512, text=THINK + ANSWER)
    async with openai_client(engine) as client:  # no reasoning or tool-call parser configured
        message, finish_reason, deltas = await ask(client, stream, messages=ASK)
        reasoning = message["reasoning_content"] if not stream else "".join(
            getattr(d, "reasoning_content", None) or "" for d in deltas)
        assert (reasoning, message["content"], finish_reason) == (THOUGHT, "It is 18C in Paris <sunny>.", "stop")
        engine.text = THINK + CALL
        message, finish_reason, _ = await ask(client, stream, messages=ASK, tools=[WEATHER])
        assert finish_reason == "tool_calls" and calls_of(message) == [("get_weather", {"city": "Paris", "unit": "C"})]
    assert not engine.active
