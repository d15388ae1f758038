"""CPU weight-only quantized linears (`tidal.models.cpu_quant`): accuracy against the float reference,
the exact Q4 GGUF -> int4 mapping, and the embedded model served with its Q4_1 blocks kept as int4."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tidal import LLM, SamplingParams
from tidal.config import ModelConfig
from tidal.models.cpu_quant import QuantLinear, gguf_q4_codes
from tidal.models.gguf_file import GGUFFile
from tidal.models.loader import load_model
from tidal.models.source import embedded_gguf_path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scheme,group", [("int8", 0), ("int4", 32), ("int4", 64)])
def test_quant_linear_matches_its_dequantized_weight(scheme, group, dtype):
    torch.manual_seed(0)
    weight, x, bias = torch.randn(96, 192) * 0.05, torch.randn(5, 192).to(dtype), torch.randn(96).to(dtype)
    layer = QuantLinear.from_float(weight, scheme, group_size=group or 32, dtype=dtype)
    deq = layer.dequantized().float()
    # The stored weight is within half a quantization step of the float one (int8: row max / 254;
    # int4: group range / 30).
    step = weight.abs().amax() / 127 if scheme == "int8" else (weight.amax() - weight.amin()) / 15
    assert (deq - weight).abs().max() <= step / 2 + 1e-2 * (dtype == torch.bfloat16)
    # The kernel computes x @ deq.T (float32 exactly up to summation order; bf16 to its rounding).
    got = layer(x, bias).float()
    want = F.linear(x.float(), deq, bias.float())
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def test_gguf_q4_1_blocks_map_exactly_to_int4():
    """Codes, scales and mins read from the embedded file's Q4_1 blocks give gguf's dequantization
    bit for bit, and the int4pack kernel's weight equals it to float32 rounding of (q - 8) d + (m + 8d)."""
    from gguf.quants import dequantize

    reader = GGUFFile(embedded_gguf_path())
    tensor = next(t for t in reader.tensors if t.name == "blk.0.attn_k.weight")
    assert tensor.tensor_type.name == "Q4_1"
    rows, cols = tensor.shape
    codes, d, m = gguf_q4_codes(tensor.data, "Q4_1", (rows, cols))
    ref = dequantize(tensor.data, tensor.tensor_type)
    mine = codes.reshape(rows, -1, 32).astype(np.float32) * d[..., None] + m[..., None]
    assert np.array_equal(mine.reshape(rows, cols), ref)
    d_t, m_t = torch.from_numpy(d), torch.from_numpy(m)
    layer = QuantLinear.from_int4_codes(torch.from_numpy(codes), d_t, m_t + 8 * d_t, 32)
    torch.testing.assert_close(layer.dequantized(), torch.from_numpy(ref), atol=1e-6, rtol=0)


def _param_bytes(model) -> int:
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _linear_bytes(model) -> int:
    total = 0
    for layer in model.layers:
        for attr in ("qkv_weight", "o_weight", "gate_up_weight", "down_weight"):
            w = getattr(layer, attr)
            total += w.nbytes() if isinstance(w, QuantLinear) else w.numel() * w.element_size()
    return total


def test_int4_embedded_model_holds_its_linears_in_a_fifth_of_the_bytes():
    plain = load_model(ModelConfig(dtype="float32")).model
    quant = load_model(ModelConfig(dtype="float32", quantization="int4")).model
    assert isinstance(quant.layers[0].qkv_weight, QuantLinear)
    # Decoder linears: 4 bytes a weight -> 0.5 (codes) + 0.25 (fp32 scale and zero per 32).
    assert _linear_bytes(quant) * 5 <= _linear_bytes(plain)
    # The whole model (the float embedding, tied to the LM head, is ~28M of its 135M weights) halves.
    assert _param_bytes(quant) * 2 <= _param_bytes(plain)


@pytest.fixture(scope="module")
def greedy_pair():
    tokenizer = __import__("tidal.tokenizer", fromlist=["load_tokenizer"]).load_tokenizer(None)
    prompts = ["The capital of France is", "def fibonacci(n):", "Water boils at"]
    ids = [tokenizer.encode(p) for p in prompts]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    outs = {}
    for quant in (None, "int4"):
        llm = LLM(dtype="float32", quantization=quant, num_kv_blocks=64)
        outs[quant] = [o.outputs[0].token_ids for o in llm.generate(ids, params)]
    return tokenizer, outs


def test_int4_embedded_model_answers_paris(greedy_pair):
    tokenizer, outs = greedy_pair
    assert "Paris" in tokenizer.decode(outs["int4"][0])


def test_int4_greedy_tokens_equal_the_dequantized_model(greedy_pair):
    """Same weights (the file's Q4_1 values), different kernel: the tokens agree."""
    _, outs = greedy_pair
    assert outs["int4"] == outs[None]
