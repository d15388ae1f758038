"""Quantized Hugging Face checkpoints are refused by name (`tidal.models.hf_loader.check_not_quantized`):
at load, and already when a deployment naming one is parsed, so `tidal serve` exits with the message
instead of loading FP8 weights with their scales ignored or failing on AWQ's packed shapes.
Tiny config folders only: no weights are needed to refuse.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tidal.bench.server import checkout_env
from tidal.config import ModelConfig
from tidal.deploy.config import DeploymentError, parse_deployment
from tidal.models.hf_loader import arch_from_hf_folder, quantization_method
from tidal.models.loader import read_arch

LLAMA = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 256,
         "max_position_embeddings": 512, "torch_dtype": "bfloat16"}

CASES = {
    "fp8": ({"quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic"}}, {}),
    "awq": ({"quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128}}, {}),
    "gptq": ({"quantization_config": {"quant_method": "gptq", "bits": 4, "desc_act": False}}, {}),
    "compressed-tensors": ({"quantization_config": {"quant_method": "compressed-tensors", "format": "float-quantized"}},
                           {}),
    "bitsandbytes": ({"quantization_config": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}}, {}),
    "gptq ": ({}, {"quantize_config.json": {"bits": 4, "group_size": 128}}),  # AutoGPTQ's own file
    "awq ": ({}, {"quant_config.json": {"w_bit": 4, "q_group_size": 128}}),  # AutoAWQ's
    "mxfp4": ({"text_config": {"quantization_config": {"quant_method": "mxfp4"}}}, {}),
}


def _folder(tmp_path, name: str, config: dict, files: dict) -> str:
    folder = tmp_path / name.strip().replace(" ", "_")
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**LLAMA, **config}))
    for file, content in files.items():
        (folder / file).write_text(json.dumps(content))
    return str(folder)


@pytest.mark.parametrize("method", list(CASES))
def test_quantized_folders_are_refused_at_load_naming_the_method(tmp_path, method):
    folder = _folder(tmp_path, method, *CASES[method])
    assert quantization_method(folder) == method.strip()
    expected = f"quantized checkpoints \\({method.strip()}\\) are not supported yet"
    with pytest.raises(ValueError, match=expected):
        arch_from_hf_folder(folder)
    with pytest.raises(ValueError, match=expected):
        read_arch(ModelConfig(model=folder))
    with pytest.raises(DeploymentError, match=f"model: .*{expected}"):
        parse_deployment({"model": folder, "workers": [{"role": "both"}]}, "my.yaml")


def test_an_unquantized_folder_passes(tmp_path):
    folder = _folder(tmp_path, "plain", {}, {})
    assert quantization_method(folder) is None
    assert arch_from_hf_folder(folder).num_layers == 2
    assert parse_deployment({"model": folder, "workers": [{"role": "both"}]}).model == folder


def test_tidal_serve_exits_with_the_message(tmp_path):
    folder = _folder(tmp_path, "fp8", *CASES["fp8"])
    done = subprocess.run([sys.executable, "-m", "tidal.cli", "serve", folder], capture_output=True, text=True,
                          env=checkout_env(), timeout=120, check=False)
    assert done.returncode == 2
    assert "quantized checkpoints (fp8) are not supported yet" in done.stderr
