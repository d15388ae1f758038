"""`vllm serve` flags on Tidal's commands: a vLLM command line runs, or says plainly why not.

Most of vLLM's common flags are Tidal's own under the same name (`--max-model-len`, `--max-num-seqs`,
`--tensor-parallel-size`, `--api-key`, `--ssl-certfile`, ...) or a second name of Tidal's flag
(`--max-num-batched-tokens` is `--token-budget`, `--enforce-eager` is `--no-cuda-graphs`):
`tidal.deploy.engine_knobs` and `tidal.deploy.server_flags` define those. This module holds the rest:
vLLM's values Tidal spells otherwise (`--dtype half`), and the flags Tidal has no knob for, each of
which is refused when given (argparse's error, exit 2) with the message naming what to use instead,
or, where the flag asks for nothing Tidal would do differently (`--trust-remote-code`: Tidal runs
its own code for every architecture), accepted with a warning (`notes`).
"""

from __future__ import annotations

import argparse

DTYPE_ALIASES = {"half": "float16", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def vllm_dtype(value: str) -> str:
    """`--dtype`: vLLM's spellings of a dtype as Tidal's."""
    return DTYPE_ALIASES.get(value, value)


def _refused(message: str):
    """An argparse type that refuses every value with `message`."""
    def refuse(value: str) -> str:
        raise argparse.ArgumentTypeError(message)
    return refuse


def _only(accepted: str, message: str):
    """An argparse type that takes `accepted` (a no-op) and refuses anything else with `message`."""
    def check(value: str) -> str:
        if value.lower() != accepted:
            raise argparse.ArgumentTypeError(f"{value!r}: {message}")
        return value
    return check


REFUSED_WITH_VALUE = {
    ("--download-dir",): "Tidal serves local files only: download the model first (huggingface-cli download "
                         "REPO --local-dir DIR) and pass DIR (or a .gguf file) as the model",
    ("--load-format",): "Tidal reads safetensors folders and GGUF files, as the model path says",
    ("--revision",): "Tidal serves local files only: check out the revision yourself and pass its folder",
    ("--swap-space",): "Tidal keeps no CPU swap of the KV cache; size the cache with --kv-cache-memory or "
                       "--num-kv-blocks",
}
ACCEPTED_ONLY = {
    "--kv-cache-dtype": ("auto", ("the KV cache takes the model's dtype (--dtype); fp8 KV caches are not "
                                  "supported yet")),
    "--pipeline-parallel-size": ("1", ("Tidal splits a model over GPUs by tensor parallelism only "
                                       "(--tensor-parallel-size)")),
}


def add_refused_model_flags(p: argparse.ArgumentParser) -> None:
    """vLLM's model flags with no Tidal knob: refused when given, or (`--trust-remote-code`) noted."""
    for names, message in REFUSED_WITH_VALUE.items():
        p.add_argument(*names, type=_refused(message), default=None, help=argparse.SUPPRESS)
    for name, (accepted, message) in ACCEPTED_ONLY.items():
        extra = ("-pp",) if name == "--pipeline-parallel-size" else ()
        p.add_argument(name, *extra, type=_only(accepted, message), default=None,
                       help=f"vLLM's flag; only {accepted} ({message})")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="accepted for vLLM command lines; Tidal never runs code from a checkpoint (it has "
                        "its own implementation of every architecture it serves)")
    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="accepted for vLLM command lines; Tidal always reads tool calls with tool_choice "
                        "auto (the format: --tool-call-parser)")


def notes(args: argparse.Namespace) -> list[str]:
    """Warnings for vLLM flags that were accepted but change nothing."""
    out = []
    if getattr(args, "trust_remote_code", False):
        out.append("--trust-remote-code has no effect: Tidal runs its own implementation of each architecture "
                   "and never code from the checkpoint")
    if getattr(args, "enable_auto_tool_choice", False):
        out.append("--enable-auto-tool-choice has no effect: Tidal reads tool calls with tool_choice auto "
                   "whenever a request has tools (the format: --tool-call-parser)")
    return out
