"""`vllm serve` command lines on `tidal serve`: each common flag maps to Tidal's knob, or is refused
with a message naming Tidal's own (`tidal.deploy.engine_knobs`, `tidal.deploy.server_flags`,
`tidal.deploy.vllm_flags`); the HTTP server's flags apply over a `-f` deployment and on
`tidal frontend` too. Parsing only: nothing is started.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from types import SimpleNamespace

import pytest

from tidal.cli import build_parser, serve_deployment_from_args
from tidal.cluster.commands import _frontend_overrides
from tidal.cluster.config import resolve
from tidal.deploy.config import DeploymentError
from tidal.deploy.vllm_flags import notes

REPO_ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = "{% for m in messages %}{{ m.content }}{% endfor %}"


def _serve(line: str):
    """(args, deployment) of `tidal serve` + the flags of `line`."""
    args = build_parser().parse_args(["serve", *shlex.split(line)])
    return args, serve_deployment_from_args(args)


def test_a_typical_vllm_serve_command_line(tmp_path, monkeypatch):
    monkeypatch.delenv("TIDAL_API_KEY", raising=False)
    template = tmp_path / "chat.jinja"
    template.write_text(TEMPLATE)
    line = (f"dummy:llama-3.1-8b --host 0.0.0.0 --port 8001 --api-key sk-1 --api-key sk-2 "
            f"--gpu-memory-utilization 0.85 --max-num-batched-tokens 8192 --max-num-seqs 64 --max-model-len 4096 "
            f"--enable-prefix-caching --chat-template {template} --served-model-name llama --tensor-parallel-size 2 "
            f"--dtype half --seed 7 --enable-chunked-prefill --kv-cache-dtype auto --trust-remote-code "
            f"--tokenizer {tmp_path} --uvicorn-log-level warning --enforce-eager -pp 1 "
            f"--allowed-origins '[\"https://ui.example\"]' --ssl-keyfile k.pem --ssl-certfile c.pem "
            f"--enable-auto-tool-choice --tool-call-parser hermes --reasoning-parser qwen3 --disable-log-requests "
            f"--device cuda")  # Tidal's default device is the CPU; vLLM's is the GPU
    args, d = _serve(line)
    (_, section, devices), = d.worker_groups()
    engine = d.engine_config(section, devices[0], devices)
    assert devices == ("cuda:0", "cuda:1") and engine.parallel.tensor_parallel_size == 2
    assert engine.cache.gpu_memory_utilization == 0.85
    assert engine.scheduler.token_budget == 8192 and engine.scheduler.max_num_seqs == 64
    assert engine.scheduler.enable_chunked_prefill and engine.cache.enable_prefix_caching
    assert engine.model.max_model_len == 4096 and engine.model.dtype == "float16" and engine.model.seed == 7
    assert engine.model.served_model_name == "llama" and engine.model.tokenizer == str(tmp_path)
    assert not engine.runner.enable_cuda_graphs
    server = d.server_config()
    assert (server.host, server.port, server.log_level) == ("0.0.0.0", 8001, "warning")
    assert server.api_keys == ("sk-1", "sk-2") and server.chat_template == str(template)
    assert server.allowed_origins == ("https://ui.example",)
    assert (server.ssl_keyfile, server.ssl_certfile) == ("k.pem", "c.pem")
    assert (server.tool_call_parser, server.reasoning_parser, server.log_requests) == ("hermes", "qwen3", False)
    assert notes(args) == [("--trust-remote-code has no effect: Tidal runs its own implementation of each "
                            "architecture and never code from the checkpoint"),
                           ("--enable-auto-tool-choice has no effect: Tidal reads tool calls with tool_choice "
                            "auto whenever a request has tools (the format: --tool-call-parser)")]


@pytest.mark.parametrize("flags, knob, value", [
    ("--no-enable-prefix-caching", "enable_prefix_caching", False),
    ("--no-prefix-caching", "enable_prefix_caching", False),  # Tidal's older spelling
    ("", "enable_prefix_caching", True),
    ("--no-enable-chunked-prefill", "enable_chunked_prefill", False),
    ("--no-chunked-prefill", "enable_chunked_prefill", False),
    ("--token-budget 300", "token_budget", 300),
    ("--dtype float", "dtype", "float32"),
    ("--dtype bfloat16", "dtype", "bfloat16"),
    ("--no-cuda-graphs", "enable_cuda_graphs", False),
    ("--quantization fp8", "quantization", "fp8"),
    ("-q FP8", "quantization", "fp8"),
])
def test_spellings_map_to_the_same_knob(flags, knob, value):
    _, d = _serve(f"dummy:llama-3.1-8b {flags}")
    (_, section, devices), = d.worker_groups()
    engine = d.engine_config(section, devices[0], devices)
    found = [getattr(part, knob) for part in (engine.model, engine.cache, engine.scheduler, engine.runner)
             if hasattr(part, knob)]
    assert found == [value]


@pytest.mark.parametrize("flags, message", [
    ("--quantization awq", "invalid choice: 'awq'"),
    ("-q gptq", "invalid choice: 'gptq'"),
    ("--kv-cache-dtype fp8", "fp8 KV caches are not supported yet"),
    ("--download-dir /models", "Tidal serves local files only"),
    ("--pipeline-parallel-size 2", "tensor parallelism only (--tensor-parallel-size)"),
    ("--load-format pt", "safetensors folders and GGUF files"),
    ("--dtype float8", "invalid choice"),
    ("--uvicorn-log-level trace", "invalid choice"),
])
def test_vllm_flags_tidal_has_no_knob_for_are_refused_with_a_pointer(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["serve", "dummy:llama-3.1-8b", *shlex.split(flags)])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    ("--gpu-memory-utilization 0.9", "choose a CUDA device (--device cuda) or set kv_cache_memory_gib"),
    ("--gpu-memory-utilization 0.9 --kv-cache-memory 4 --device cuda", "not both"),
    ("--gpu-memory-utilization 1.5 --device cuda", "gpu_memory_utilization"),
    ("--max-requests-per-minute-per-key 10", "per-key limits need API keys"),
    ("--ssl-certfile c.pem", "ssl_keyfile and ssl_certfile go together"),
    ("--chat-template no-such-file.jinja", "neither a file nor a Jinja template"),
])
def test_flag_values_that_cannot_work_are_refused_before_anything_starts(flags, message, monkeypatch):
    monkeypatch.delenv("TIDAL_API_KEY", raising=False)
    with pytest.raises(DeploymentError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _serve(f"dummy:llama-3.1-8b {flags}")


def test_server_flags_apply_over_a_deployment_file(monkeypatch):
    monkeypatch.delenv("TIDAL_API_KEY", raising=False)
    config = REPO_ROOT / "examples" / "agg.yaml"
    _, d = _serve(f"-f {config} --host 0.0.0.0 --api-key sk-f --max-concurrent-requests-per-key 4 "
                  f"--allowed-origins https://a.example,https://b.example --allow-credentials --max-migrations 1")
    server = d.server_config()
    assert server.api_keys == ("sk-f",) and server.max_concurrent_requests_per_key == 4
    assert server.allowed_origins == ("https://a.example", "https://b.example") and server.allow_credentials
    assert d.frontend.host == "0.0.0.0" and d.frontend.max_migrations == 1
    assert d.engine.token_budget == 512  # the file's own settings stay


def test_tidal_frontend_takes_the_server_flags(monkeypatch):
    monkeypatch.delenv("TIDAL_API_KEY", raising=False)
    args = build_parser().parse_args(shlex.split(
        "frontend --etcd http://etcd:2379 --nats nats://nats:4222 --api-key sk-c --require-api-key-for-metrics "
        "--ssl-keyfile k.pem --ssl-certfile c.pem --ssl-ca-certs ca.pem --ssl-cert-reqs 2"))
    server = resolve(None, _frontend_overrides(args)).deployment().server_config()
    assert server.api_keys == ("sk-c",) and server.require_api_key_for_metrics
    assert (server.ssl_ca_certs, server.ssl_cert_reqs) == ("ca.pem", 2)


def test_gpu_memory_utilization_sizes_the_kv_cache_from_the_device(monkeypatch):
    """The engine side of --gpu-memory-utilization (`kv_cache_bytes`), with the device's numbers
    stubbed: the fraction of the card, less what this process holds once the weights are loaded."""
    import torch

    from tidal.config import CacheConfig, EngineConfig
    from tidal.engine.model_runner import kv_cache_bytes

    gib = 1 << 30
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 16 * gib)
    on_cuda = SimpleNamespace(device="cuda:0")
    config = EngineConfig(cache=CacheConfig(gpu_memory_utilization=0.9))
    assert kv_cache_bytes(config, on_cuda) == int(0.9 * 80 * gib) - 16 * gib
    assert kv_cache_bytes(EngineConfig(cache=CacheConfig(kv_cache_memory_bytes=3 * gib)), on_cuda) == 3 * gib
    with pytest.raises(ValueError, match="leaves nothing for the KV cache"):
        kv_cache_bytes(EngineConfig(cache=CacheConfig(gpu_memory_utilization=0.2)), on_cuda)
    with pytest.raises(ValueError, match="on cpu set kv_cache_memory_gib"):
        kv_cache_bytes(config, SimpleNamespace(device="cpu"))
