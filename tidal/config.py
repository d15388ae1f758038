"""Configuration: frozen dataclasses, one per concern, resolved once at start and never mutated.

Environment variables are read here and nowhere else (`env_*` helpers below).
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def env_str(name: str, default: str | None = None) -> str | None:
    """The one place the package reads environment variables."""
    return os.environ.get(name, default)


@dataclass(frozen=True)
class ModelConfig:
    model: str | None = None
    """GGUF file, Hugging Face folder, `dummy:ARCH`, or None for the embedded SmolLM2."""
    tokenizer: str | None = None
    """A folder with tokenizer.json or a .gguf file, instead of the model's own tokenizer."""
    served_model_name: str | None = None
    """Name clients use in the `model` field; defaults to the model's own name."""
    dtype: str = "auto"
    """`float32`, `bfloat16`, `float16` or `auto` (float32 on CPU, bfloat16 on CUDA)."""
    device: str = "cpu"
    """`cpu` or `cuda` (or `cuda:N`)."""
    max_model_len: int | None = None
    """Longest prompt + output in tokens; defaults to the model's context length."""
    seed: int = 0
    """Seed for dummy weights and for requests that don't carry one."""


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    """Tokens per KV block."""
    num_blocks: int | None = None
    """KV blocks in the pool; None: size from `kv_cache_memory_bytes`."""
    kv_cache_memory_bytes: int = 1 << 30
    """Memory given to the KV cache when `num_blocks` is None."""
    enable_prefix_caching: bool = True
    """Reuse blocks whose chained hash matches a prompt's prefix."""


@dataclass(frozen=True)
class SchedulerConfig:
    token_budget: int = 256
    """Tokens (decode tokens plus prefill chunk tokens) the scheduler may run in one step."""
    max_num_seqs: int = 128
    """Requests running at once."""
    enable_chunked_prefill: bool = True
    """Split long prompts over several steps; off: a prompt is prefilled whole in one step."""


@dataclass(frozen=True)
class RunnerConfig:
    attention_backend: str = "auto"
    """`torch` (plain torch, any device), `triton` (the Triton kernels, CUDA) or `auto` (Triton on CUDA
    when it is installed, else torch)."""
    enable_cuda_graphs: bool = True
    """Capture decode steps as CUDA graphs (CUDA with the Triton backend only)."""
    cuda_graph_max_batch: int = 256
    """Largest decode batch run from a graph; larger batches run eagerly. Capped by `max_num_seqs`."""


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    """Ranks that split every layer (attention heads, MLP rows, vocabulary) over as many devices.
    Rank 0 runs the engine and leads; the others follow its steps (`tidal.engine.tensor_parallel`)."""
    devices: tuple[str, ...] = ()
    """The device of each rank, rank 0's first (the one `model.device` names); empty:
    `rank_devices(model.device, tensor_parallel_size)`."""

    def __post_init__(self):
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be at least 1, got {self.tensor_parallel_size}")
        if self.devices and len(self.devices) != self.tensor_parallel_size:
            raise ValueError(f"parallel.devices lists {len(self.devices)} devices for "
                             f"tensor_parallel_size={self.tensor_parallel_size}")


def rank_devices(device: str, tensor_parallel_size: int) -> tuple[str, ...]:
    """One device per rank from the first: `cuda:N` -> cuda:N, cuda:N+1, ...; `cpu` -> cpu for all."""
    if device == "cpu":
        return ("cpu",) * tensor_parallel_size
    kind, _, index = device.partition(":")
    if kind != "cuda" or not (index or "0").isdigit():
        raise ValueError(f"device {device!r} is neither cpu nor cuda[:N]")
    first = int(index or 0)
    return tuple(f"cuda:{first + rank}" for rank in range(tensor_parallel_size))


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    max_request_body_bytes: int = 8 << 20
    """Bodies larger than this get a 413."""
    log_level: str = "info"
    response_headers: tuple[tuple[str, str], ...] = ()
    """Sent with every response (an API server names itself: `x-tidal-api-server: INDEX`)."""


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def replace(self, **changes) -> EngineConfig:
        return dataclasses.replace(self, **changes)


NAMESPACE_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True)
class PlaneConfig:
    """Which discovery and event planes a process uses: embedded (nothing configured) or etcd and
    NATS (`tidal.runtime.planes` builds them)."""

    etcd_endpoints: tuple[str, ...] = ()
    """etcd client URLs (`http://10.0.0.5:2379`); empty: discovery is the process's own table."""
    nats_url: str | None = None
    """NATS server URL (`nats://10.0.0.5:4222`), several joined by commas; None: events go over
    ZMQ PUB/SUB, each worker binding its own socket."""
    namespace: str = "default"
    """Keeps deployments that share etcd and NATS apart: etcd keys under `/tidal/<namespace>/`,
    NATS subjects under `tidal.<namespace>.`."""
    lease_ttl_s: int = 10
    """A worker's etcd lease: a worker that stops renewing it (dead, cut off) disappears from
    discovery this long after its last renewal."""

    def __post_init__(self) -> None:
        if not NAMESPACE_PATTERN.match(self.namespace):
            raise ValueError(f"namespace {self.namespace!r}: use letters, digits, '-' and '_' only")
        if self.lease_ttl_s < 2:
            raise ValueError(f"lease_ttl_s={self.lease_ttl_s}: etcd grants no lease shorter than 2 s")

    @property
    def nats_servers(self) -> list[str]:
        return [url.strip() for url in (self.nats_url or "").split(",") if url.strip()]


def resolve_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
            "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
