"""MXFP4 weights (`tidal.models.mxfp4`), gpt-oss's expert format:

- dequantizing to bf16 is bit-exact against transformers' own `convert_moe_packed_tensors`, over
  every byte of codes and every E8M0 exponent but NaN's (infinities where the scale overflows bf16 included);
- FP8 e4m3 conversion: per-block scales are exact; per-row scales are exact within 14 binades of the
  row's largest exponent and within scale * 2^-10 below it;
- a random bf16 weight quantized by Tidal's own quantizer, saved as a gpt-oss checkpoint
  (`_blocks` and `_scales` in different shards, biases beside them) and read through the loader's
  path comes back as transformers dequantizes it, near the original weight;
- `check_not_quantized` lets MXFP4 through for gpt-oss only.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from tidal.models.hf_loader import check_not_quantized, load_hf_weights
from tidal.models.mxfp4 import (
    E8M0_BIAS,
    dequantize_fp8,
    dequantize_mxfp4,
    experts_from_mxfp4,
    mxfp4_checkpoint_tensors,
    mxfp4_expert_tensors,
    mxfp4_to_fp8,
    quantize_mxfp4,
)

EXPERTS, ROWS, GROUPS = 3, 12, 4  # K = 128 input columns


def _random_pair(seed: int, scale_range: tuple[int, int] = (0, 255)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (EXPERTS, ROWS, GROUPS, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(*scale_range, (EXPERTS, ROWS, GROUPS), dtype=torch.uint8, generator=g)
    return blocks, scales


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(torch.int16)


def test_every_code_byte_dequantizes_bit_exact_to_transformers():
    blocks = torch.arange(256, dtype=torch.uint8).reshape(1, 16, 1, 16).expand(2, 16, 1, 16).contiguous()
    scales = torch.tensor([[E8M0_BIAS] * 16, [E8M0_BIAS - 3] * 16], dtype=torch.uint8).unsqueeze(-1)
    ours, theirs = experts_from_mxfp4(blocks, scales), convert_moe_packed_tensors(blocks, scales)
    assert torch.equal(_bits(ours), _bits(theirs))
    # The low nibble comes first: byte 0x21 is the codes 1 (0.5) then 2 (1.0).
    rows = dequantize_mxfp4(blocks, scales, torch.float32)
    assert rows[0, 2, 2:4].tolist() == [0.5, 1.0]  # byte 0x21 = 33 is the second of row 2
    assert rows[1, 2, 2:4].tolist() == [0.5 / 8, 1.0 / 8]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_blocks_and_every_exponent_match_transformers_bit_for_bit(seed):
    blocks, scales = _random_pair(seed)  # exponents 0..254 (255 is E8M0's NaN, in no checkpoint)
    scales[0, 0, :] = torch.tensor([0, 1, 253, 254])  # the extremes: subnormal bf16 and overflow
    theirs = convert_moe_packed_tensors(blocks, scales)
    ours = experts_from_mxfp4(blocks, scales)
    assert ours.shape == theirs.shape == (EXPERTS, GROUPS * 32, ROWS) and ours.dtype == torch.bfloat16
    assert torch.equal(_bits(ours), _bits(theirs))
    # The rows layout is the same values, output rows first.
    assert torch.equal(_bits(dequantize_mxfp4(blocks, scales).transpose(1, 2)), _bits(ours))


def test_a_pair_that_does_not_fit_is_refused():
    blocks, scales = _random_pair(0)
    with pytest.raises(ValueError, match="do not match"):
        dequantize_mxfp4(blocks, scales[..., :-1])
    with pytest.raises(ValueError, match="uint8"):
        dequantize_mxfp4(blocks.to(torch.int32), scales)
    with pytest.raises(ValueError, match=r"\[E, R, G, 16\]"):
        experts_from_mxfp4(blocks[0], scales[0])
    with pytest.raises(ValueError, match="granularity"):
        mxfp4_to_fp8(blocks, scales, "tensor")


def test_fp8_with_block_scales_is_exact():
    blocks, scales = _random_pair(3, (1, 255))
    weight, scale = mxfp4_to_fp8(blocks, scales, "block")
    assert weight.dtype == torch.float8_e4m3fn and weight.shape == (EXPERTS, ROWS, GROUPS * 32)
    assert scale.shape == (EXPERTS, ROWS, GROUPS)
    exact = dequantize_mxfp4(blocks, scales, torch.float32)
    assert torch.equal(dequantize_fp8(weight, scale), exact)


def test_fp8_with_row_scales_is_exact_within_14_binades_and_bounded_below():
    blocks, scales = _random_pair(4, (100, 115))  # each row spans at most 14 binades
    weight, scale = mxfp4_to_fp8(blocks, scales, "row")
    assert scale.shape == (EXPERTS, ROWS, 1) and weight.abs().to(torch.float32).max() <= 384
    assert torch.equal(dequantize_fp8(weight, scale), dequantize_mxfp4(blocks, scales, torch.float32))

    blocks, scales = _random_pair(5, (60, 160))  # rows spanning up to 100 binades
    weight, scale = mxfp4_to_fp8(blocks, scales, "row")
    error = (dequantize_fp8(weight, scale) - dequantize_mxfp4(blocks, scales, torch.float32)).abs()
    assert (error <= scale * 2.0 ** -10).all()
    assert error.max() > 0  # something did round: the bound was tested, not vacuous
    near = (scales.amax(-1, keepdim=True) - scales <= 14).repeat_interleave(32, dim=-1)
    assert (error[near] == 0).all()


def test_quantizer_round_trip_is_near_the_weight_and_stable():
    weight = (torch.randn(EXPERTS, ROWS, GROUPS * 32, generator=torch.Generator().manual_seed(6)) * 0.02)
    weight[0, 0, :32] = 0  # an all-zero block
    weight = weight.to(torch.bfloat16)
    blocks, scales = quantize_mxfp4(weight)
    assert blocks.shape == (EXPERTS, ROWS, GROUPS, 16) and scales.shape == (EXPERTS, ROWS, GROUPS)
    back = dequantize_mxfp4(blocks, scales, torch.float32)
    step = torch.exp2(scales.to(torch.float32) - E8M0_BIAS).repeat_interleave(32, dim=-1)
    assert ((back - weight.float()).abs() <= 2 * step).all()  # clamping 8 -> 6 at worst
    assert (back - weight.float()).norm() / weight.float().norm() < 0.15
    assert torch.equal(back[0, 0, :32], torch.zeros(32))
    again_blocks, again_scales = quantize_mxfp4(back)
    assert torch.equal(again_blocks, blocks) and torch.equal(again_scales, scales)


PREFIX = "model.layers.0.mlp.experts."


def _gpt_oss_folder(tmp_path, weight_up: torch.Tensor, weight_down: torch.Tensor) -> str:
    """A two-shard gpt-oss-style checkpoint: gate_up's blocks in one shard, its scales in the other."""
    up_blocks, up_scales = quantize_mxfp4(weight_up)
    down_blocks, down_scales = quantize_mxfp4(weight_down)
    shards = {
        "model-00001-of-00002.safetensors": {PREFIX + "gate_up_proj_blocks": up_blocks,
                                             PREFIX + "down_proj_blocks": down_blocks,
                                             PREFIX + "down_proj_scales": down_scales,
                                             PREFIX + "gate_up_proj_bias": torch.ones(weight_up.shape[:2])},
        "model-00002-of-00002.safetensors": {PREFIX + "gate_up_proj_scales": up_scales,
                                             "model.norm.weight": torch.ones(weight_up.shape[2])},
    }
    for file, tensors in shards.items():
        save_file(tensors, str(tmp_path / file))
    weight_map = {name: file for file, tensors in shards.items() for name in tensors}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "gpt_oss", "architectures": ["GptOssForCausalLM"],
        "quantization_config": {"quant_method": "mxfp4",
                                "modules_to_not_convert": ["model.layers.*.self_attn", "model.embed_tokens",
                                                           "model.layers.*.mlp.router", "lm_head"]}}))
    return str(tmp_path)


class RecordingModel:
    """The loader's side of `LlamaModel` (`weight_slot`, `load_weight`, `check_loaded`), recording."""

    def __init__(self, wanted: set[str]) -> None:
        self.wanted, self.loaded, self.checked = wanted, {}, False

    def weight_slot(self, name: str):
        return name if name in self.wanted else None

    def load_weight(self, name: str, tensor: torch.Tensor) -> None:
        self.loaded[name] = tensor

    def check_loaded(self) -> None:
        self.checked = True


def test_a_saved_checkpoint_loads_through_the_hook_as_transformers_dequantizes_it(tmp_path):
    g = torch.Generator().manual_seed(7)
    weight_up = torch.randn(EXPERTS, 2 * 32, 4 * 32, generator=g).to(torch.bfloat16)  # [E, 2I, H]
    weight_down = torch.randn(EXPERTS, 4 * 32, 32, generator=g).to(torch.bfloat16)  # [E, H, I]
    folder = _gpt_oss_folder(tmp_path, weight_up, weight_down)
    check_not_quantized(folder)  # accepted: gpt-oss in MXFP4
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    paths = [str(tmp_path / file) for file in sorted(set(index.values()))]
    tensors = dict(mxfp4_checkpoint_tensors(paths))
    assert sorted(tensors) == sorted([PREFIX + "gate_up_proj", PREFIX + "down_proj",
                                      PREFIX + "gate_up_proj_bias", "model.norm.weight"])
    for name, weight in ((PREFIX + "gate_up_proj", weight_up), (PREFIX + "down_proj", weight_down)):
        blocks, scales = quantize_mxfp4(weight)
        assert torch.equal(_bits(tensors[name]), _bits(convert_moe_packed_tensors(blocks, scales)))
        assert tensors[name].shape == weight.transpose(1, 2).shape  # [E, in, out], as bf16 gpt-oss stores it
        relative = (tensors[name].float() - weight.transpose(1, 2).float()).norm() / weight.float().norm()
        assert relative < 0.15
    assert torch.equal(tensors[PREFIX + "gate_up_proj_bias"], torch.ones(EXPERTS, 2 * 32))

    model = RecordingModel({PREFIX + "gate_up_proj", "model.norm.weight"})
    load_hf_weights(model, folder)
    assert sorted(model.loaded) == sorted(model.wanted) and model.checked
    assert torch.equal(model.loaded[PREFIX + "gate_up_proj"], tensors[PREFIX + "gate_up_proj"])


def test_the_hook_pairs_names():
    blocks, scales = _random_pair(8, (120, 130))
    stored = {"x.gate_up_proj_blocks": blocks, "x.gate_up_proj_scales": scales, "x.bias": torch.zeros(2),
              "y_scales": torch.ones(1)}  # a name ending in _scales without blocks is a plain tensor
    get, has = stored.__getitem__, stored.__contains__
    name, tensor = mxfp4_expert_tensors("x.gate_up_proj_blocks", get, has)
    assert name == "x.gate_up_proj"
    assert torch.equal(_bits(tensor), _bits(convert_moe_packed_tensors(blocks, scales)))
    assert mxfp4_expert_tensors("x.gate_up_proj_scales", get, has) is None
    assert mxfp4_expert_tensors("x.bias", get, has)[0] == "x.bias"
    assert mxfp4_expert_tensors("y_scales", get, has)[0] == "y_scales"


@pytest.mark.parametrize(("model_type", "method", "accepted"), [
    ("gpt_oss", "mxfp4", True), ("llama", "mxfp4", False), ("gpt_oss", "fp8", False)])
def test_only_gpt_oss_mxfp4_gets_past_the_quantization_check(tmp_path, model_type, method, accepted):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type,
                                                      "quantization_config": {"quant_method": method}}))
    if accepted:
        check_not_quantized(str(tmp_path))
    else:
        with pytest.raises(ValueError, match=f"quantized checkpoints \\({method}\\) are not supported yet"):
            check_not_quantized(str(tmp_path))
