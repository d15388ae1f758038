"""FP8 (e4m3) weights (`tidal.models.fp8`), on the CPU reference path:

- quantization round trips within e4m3's rounding (per row, per 128x128 block), and `Fp8Linear` (per
  tensor, per row, per block) matches x @ dequantized W within the error its per-token activation
  quantization adds, and the float32 math of that reference exactly;
- a tiny FP8 checkpoint made here from a random transformers `LlamaForCausalLM` (block scales in
  `weight_scale_inv`, or per-tensor ones) loads: logits equal transformers running the same FP8 math
  (its linears replaced by `reference_linear`), stay close to the dequantized float model, and the
  engine's greedy tokens equal transformers';
- `--quantization fp8` on a dummy preset generates, with the decoder linears at 1 byte a weight;
- tensor parallel (2 gloo ranks) FP8 models equal their unsharded selves (block and row scales);
- FP8 variants Tidal does not load are refused with the reason.
GPU tests (`gpu`) compare the `torch._scaled_mm` and block paths to the reference.
"""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests._models_fixtures import PagedSequences
from tidal import LLM, SamplingParams
from tidal.config import ModelConfig
from tidal.models.arch import get_preset, param_count, quantized_param_count, weight_bytes
from tidal.models.fp8 import (
    BLOCK,
    E4M3_MAX,
    FP8_DTYPE,
    Fp8Linear,
    dequantize,
    quantize_blocks,
    quantize_rows,
    reference_linear,
)
from tidal.models.loader import load_model
from tidal.runtime.ports import free_port

TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 128, "intermediate_size": 256,
        "vocab_size": 384, "num_hidden_layers": 2, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
        "torch_dtype": "float32"}
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPT = [1, 17, 300, 42, 8, 99, 250, 3, 77]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _error_bound(w: torch.Tensor, scale_full: torch.Tensor) -> torch.Tensor:
    """e4m3 round to nearest: half an ulp (2^-4 relative) or, below 2^-6, half the subnormal step 2^-9."""
    return w.abs() * 2 ** -4 + scale_full * 2 ** -9 + 1e-12


def test_quantize_round_trips_within_e4m3_rounding():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 200, generator=g) * torch.logspace(-3, 1, 300).unsqueeze(1)  # rows of many magnitudes
    w8, scale = quantize_rows(w)
    assert w8.dtype == FP8_DTYPE and scale.shape == (300, 1)
    assert (dequantize(w8, scale) - w).abs().le(_error_bound(w, scale)).all()
    assert torch.allclose(w8.float().abs().amax(dim=1), torch.full((300,), E4M3_MAX))  # each row's max hits 448
    b8, bscale = quantize_blocks(w)
    assert bscale.shape == (3, 2)  # ceil(300 / 128), ceil(200 / 128): partial last blocks
    full = bscale.repeat_interleave(BLOCK, 0)[:300].repeat_interleave(BLOCK, 1)[:, :200]
    assert (dequantize(b8, bscale) - w).abs().le(_error_bound(w, full)).all()


def _linear(layout: str, w: torch.Tensor) -> Fp8Linear:
    """An `Fp8Linear` holding `w` quantized per tensor ("tensor": one scale written into every row),
    per row, or per block."""
    linear = Fp8Linear(*w.shape, "fp8-block" if layout == "block" else "fp8", "cpu")
    if layout == "tensor":
        scale = w.abs().max() / E4M3_MAX
        w8, scale = (w / scale).to(FP8_DTYPE), scale.expand(w.shape[0], 1)
    else:
        w8, scale = quantize_blocks(w) if layout == "block" else quantize_rows(w)
    linear.weight.copy_(w8)
    linear.weight_scale.copy_(scale)
    return linear


@pytest.mark.parametrize("layout", ["tensor", "row", "block"])
def test_fp8_linear_matches_the_dequantized_reference(layout):
    g = torch.Generator().manual_seed(1)
    w, x, bias = torch.randn(384, 256, generator=g) * 0.05, torch.randn(7, 256, generator=g), torch.randn(384)
    linear = _linear(layout, w)
    out = linear(x, bias)
    dequantized = linear.dequantized()
    exact = F.linear(x, dequantized, bias)
    # The only error against x @ W8' is the per-token activation rounding (2^-4 relative at most).
    assert float((out - exact).norm() / (exact - bias).norm()) < 2 ** -4
    x8, x_scale = quantize_rows(x)
    assert torch.allclose(out, F.linear(x8.float() * x_scale, dequantized, bias), atol=1e-5, rtol=1e-5)
    assert float((F.linear(x, w, bias) - out).norm() / F.linear(x, w).norm()) < 0.1  # vs the unquantized W


# ---- a tiny FP8 checkpoint, quantized here from a random transformers Llama ----

def _write_tokenizer(folder: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(folder / "tokenizer.json"))


def _hf_model(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = {k: v for k, v in {**TINY, **overrides}.items() if k not in ("architectures", "model_type")}
    model = LlamaForCausalLM(LlamaConfig(**config)).eval()
    with torch.no_grad():  # transformers' init (std 0.02) gives near-uniform logits: widen it
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                p.mul_(4.0)
    return model


def write_fp8_folder(folder: Path, layout: str = "block", seed: int = 0, **overrides) -> tuple[Path, dict]:
    """An FP8 checkpoint as FP8 models ship: decoder linears float8_e4m3fn + `weight_scale_inv` (a
    128x128 block scale, or one per-tensor value), the rest float. Returns it and the dequantized
    state dict (the float weights the FP8 ones stand for)."""
    from safetensors.torch import save_file

    model = _hf_model(seed, **overrides)
    tensors, dequantized = {}, {}
    for name, p in model.state_dict().items():
        p = p.detach().contiguous()
        if name.endswith("proj.weight"):
            if layout == "block":
                w8, scale = quantize_blocks(p)
            else:
                scale = p.abs().max().reshape(()) / E4M3_MAX
                w8 = (p / scale).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)
            tensors[name], tensors[name + "_scale_inv"] = w8, scale
            dequantized[name] = dequantize(w8, scale.reshape(1, 1).expand(p.shape[0], 1) if scale.dim() == 0
                                           else scale)
        else:
            tensors[name] = dequantized[name] = p
    quant = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    if layout == "block":
        quant["weight_block_size"] = [BLOCK, BLOCK]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**TINY, **overrides, "quantization_config": quant}))
    _write_tokenizer(folder, TINY["vocab_size"])
    save_file(tensors, str(folder / "model.safetensors"))
    return folder, dequantized


class _ReferenceFp8(torch.nn.Module):
    """A transformers linear replaced by the FP8 math (per-token activations, dequantized weight)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        x8, x_scale = quantize_rows(x.reshape(-1, x.shape[-1]))
        return F.linear((x8.float() * x_scale).view_as(x), self.linear.weight)


def _reference(dequantized: dict, fp8_activations: bool, **overrides):
    model = _hf_model(**overrides)
    model.load_state_dict(dequantized)
    if fp8_activations:
        for layer in model.model.layers:
            for owner in (layer.self_attn, layer.mlp):
                for proj in LINEARS:
                    if hasattr(owner, proj):
                        setattr(owner, proj, _ReferenceFp8(getattr(owner, proj)))
    return model


@pytest.fixture(scope="module", params=["block", "tensor"])
def fp8_folder(request, tmp_path_factory):
    return (request.param, *write_fp8_folder(tmp_path_factory.mktemp(request.param), request.param))


def test_fp8_checkpoint_logits_match_transformers(fp8_folder):
    layout, folder, dequantized = fp8_folder
    loaded = load_model(ModelConfig(model=str(folder), dtype="float32"))
    assert loaded.arch.quantization == ("fp8-block" if layout == "block" else "fp8")
    layer = loaded.model.layers[0]
    assert layer.qkv_weight.weight.dtype == FP8_DTYPE and loaded.model.lm_head.dtype == torch.float32
    ours = PagedSequences(loaded.model).step({}, {"a": PROMPT})["a"]
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        same_math = _reference(dequantized, True)(ids).logits[0]
        float_model = _reference(dequantized, False)(ids).logits[0]
    assert float((ours - same_math).abs().max()) < 1e-3
    # Activation rounding only: ~2^-4 / sqrt(3) rms per quantized activation, 4 per layer, 2 layers.
    assert float((ours - float_model).norm() / float_model.norm()) < 0.15


def test_fp8_checkpoint_greedy_tokens_through_the_engine(fp8_folder):
    _, folder, dequantized = fp8_folder
    reference = _reference(dequantized, True)
    tokens = list(PROMPT)
    with torch.no_grad():
        for _ in range(8):
            tokens.append(int(reference(torch.tensor([tokens])).logits[0, -1].argmax()))
    with LLM(str(folder), dtype="float32", num_kv_blocks=64, block_size=4, token_budget=4) as llm:
        out = llm.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    assert out[0].outputs[0].token_ids == tokens[len(PROMPT):]


def test_quantization_fp8_on_a_dummy_preset_halves_the_linear_bytes():
    def linear_bytes(model):
        return sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                   if any(linear in n for linear in ("qkv_weight", "o_weight", "gate_up_weight", "down_weight")))

    bf16 = load_model(ModelConfig(model="dummy:tiny-llama", dtype="bfloat16")).model
    fp8 = load_model(ModelConfig(model="dummy:tiny-llama", dtype="bfloat16", quantization="fp8")).model
    weights = [p for n, p in fp8.named_parameters() if p.dtype == FP8_DTYPE]
    assert len(weights) == 4 * fp8.arch.num_layers and all(float(w.float().abs().max()) > 0 for w in weights)
    assert fp8.embed_tokens.dtype == fp8.lm_head.dtype == torch.bfloat16
    fp8_weights = sum(w.numel() for w in weights)
    assert fp8_weights == quantized_param_count(fp8.arch)
    scales = sum(p.numel() for n, p in fp8.named_parameters() if n.endswith("weight_scale"))
    assert linear_bytes(fp8) == linear_bytes(bf16) // 2 + 4 * scales  # 1 byte a weight, float32 row scales
    arch = get_preset("llama-3.1-70b")
    quantized = weight_bytes(arch.replace(quantization="fp8"), 2)
    assert weight_bytes(arch, 2) == 2 * param_count(arch)
    assert quantized < 0.53 * weight_bytes(arch, 2) and quantized < 75e9  # 70B FP8 fits one H200 (141 GB)
    with LLM("dummy:tiny-llama", quantization="fp8", num_kv_blocks=32) as llm:
        out = llm.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 5


def test_quantization_fp8_on_a_float_checkpoint_stays_close(tmp_path):
    from safetensors.torch import save_file

    model = _hf_model(seed=3)
    folder = tmp_path / "float"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    quantized = load_model(ModelConfig(model=str(folder), dtype="float32", quantization="fp8")).model
    assert quantized.arch.quantization == "fp8"
    ours = PagedSequences(quantized).step({}, {"a": PROMPT})["a"]
    with torch.no_grad():
        ref = model(torch.tensor([PROMPT])).logits[0]
    assert float((ours - ref).norm() / ref.norm()) < 0.2  # weight and activation rounding


# ---- tensor parallel: 2 gloo ranks ----

def _weight_diff(sharded, whole, rank: int) -> float:
    """Largest difference between a rank's dequantized FP8 weights and its slices of the whole model's,
    relative to the weight's largest magnitude."""
    worst = 0.0
    for ours, full in zip(sharded.layers, whole.layers):
        q, kv, inter = ours.q_size, ours.kv_size, ours.intermediate_size
        qkv = full.qkv_weight.dequantized().split([2 * q, 2 * kv, 2 * kv])
        expected = {"qkv_weight": torch.cat([part.chunk(2)[rank] for part in qkv]),
                    "gate_up_weight": torch.cat([part.chunk(2)[rank]
                                                 for part in full.gate_up_weight.dequantized().chunk(2)]),
                    "o_weight": full.o_weight.dequantized()[:, rank * q:(rank + 1) * q],
                    "down_weight": full.down_weight.dequantized()[:, rank * inter:(rank + 1) * inter]}
        for name, want in expected.items():
            worst = max(worst, float((getattr(ours, name).dequantized() - want).abs().max() / want.abs().max()))
    return worst


def _tp_rank(rank: int, port: int, folders: dict[str, str], results) -> None:
    from tidal.parallel.group import destroy_tensor_parallel, init_tensor_parallel

    torch.set_num_threads(1)
    try:
        init_tensor_parallel(rank, 2, f"tcp://127.0.0.1:{port}", "gloo")
        diffs = {}
        for name, folder in folders.items():
            quantization = "fp8" if name == "float" else None
            config = ModelConfig(model=folder, dtype="float32", quantization=quantization)
            sharded = PagedSequences(load_model(config, tp_rank=rank, tp_size=2).model)
            whole = PagedSequences(load_model(config).model)
            diffs[f"{name} weights"] = _weight_diff(sharded.model, whole.model, rank)
            for step, (decodes, prefills) in enumerate([({}, {"a": PROMPT}), ({"a": 5}, {"b": [3, 4, 5]})]):
                ours, ref = sharded.step(decodes, prefills), whole.step(decodes, prefills)
                diffs[f"{name} {step}"] = max(float((ours[k] - ref[k]).norm() / ref[k].norm()) for k in ref)
        results.put((rank, diffs))
        destroy_tensor_parallel()
    except BaseException as exc:
        results.put((rank, repr(exc)))
        raise


def test_tp2_fp8_models_equal_tp1(tmp_path, fp8_folder):
    from safetensors.torch import save_file

    layout, folder, _ = fp8_folder
    folders = {layout: str(folder)}
    if layout == "block":  # once: a float checkpoint quantized at load, per row
        plain = tmp_path / "float"
        plain.mkdir()
        (plain / "config.json").write_text(json.dumps(TINY))
        save_file({k: v.contiguous() for k, v in _hf_model(seed=5).state_dict().items()},
                  str(plain / "model.safetensors"))
        folders["float"] = str(plain)
    ctx = multiprocessing.get_context("spawn")
    results, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_tp_rank, args=(rank, port, folders, results)) for rank in range(2)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=180) for _ in procs)
    for p in procs:
        p.join(30)
    for rank in range(2):
        assert isinstance(got[rank], dict), f"rank {rank} failed: {got[rank]}"
        assert len(got[rank]) == 3 * len(folders)
        for name, diff in got[rank].items():
            # Weights: exact slices. Logits: o_proj and down_proj quantize each rank's half of a token's
            # activations with its own scale, so a sharded step rounds differently (as in vLLM).
            # A float checkpoint quantized per row at load: a rank's o/down rows have their own scales.
            bound = 0.12 if not name.endswith("weights") else 2 ** -4 if name.startswith("float") else 0.0
            assert diff <= bound, f"rank {rank}: {name} differs from unsharded by {diff}"


# ---- refusals ----

@pytest.mark.parametrize("quant, overrides, message", [
    ({"activation_scheme": "static"}, {}, "activation_scheme 'static'"),
    ({"weight_block_size": [64, 64]}, {}, "weight_block_size"),
    ({"modules_to_not_convert": ["model.layers.0.mlp.down_proj"]}, {}, "unquantized decoder modules"),
    ({}, {"num_local_experts": 4}, "mixture-of-experts"),
])
def test_unsupported_fp8_checkpoints_are_refused(tmp_path, quant, overrides, message):
    from tidal.models.hf_loader import arch_from_hf_folder

    (tmp_path / "config.json").write_text(json.dumps(
        {**TINY, **overrides, "quantization_config": {"quant_method": "fp8", **quant}}))
    with pytest.raises(ValueError, match=message):
        arch_from_hf_folder(str(tmp_path))


def test_block_scales_split_by_the_layout_are_refused(tmp_path):
    folder, _ = write_fp8_folder(tmp_path, "block", head_dim=64, num_key_value_heads=1)  # k rows 256..320
    with pytest.raises(ValueError, match="split a block"):
        load_model(ModelConfig(model=str(folder), dtype="float32"))


# ---- GPU: the CUDA paths against the reference ----

@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["row", "block"])
@pytest.mark.parametrize("tokens", [1, 64, 300])
def test_cuda_fp8_linear_matches_the_reference(layout, tokens):
    g = torch.Generator().manual_seed(2)
    w, x = torch.randn(1024, 512, generator=g) * 0.05, torch.randn(tokens, 512, generator=g)
    linear = _linear(layout, w).cuda()
    ref = reference_linear(x, linear.weight.cpu(), linear.weight_scale.cpu())
    out = linear(x.cuda().bfloat16()).float().cpu()
    assert float((out - ref).norm() / ref.norm()) < 1e-2  # bf16 output rounding
