"""Configuration: frozen dataclasses, one per concern, resolved once at start and never mutated.

Every knob has its one default here. A field's annotation carries its bounds and choices
(`Positive`, `Literal[...]`); `__post_init__` checks them (`validate_fields`), and the YAML
sections of `tidal.deploy.config` are derived from the same annotations, so a bad value is refused
the same way whichever door it came in by. `ENGINE_KNOBS` names the flat engine settings a user
writes (`token_budget`, `num_kv_blocks`, ...); `tidal.deploy.engine_knobs` turns them into an
`EngineConfig`, with a role's scheduler limits from a profile.

Environment variables are read here and nowhere else (`env_*` helpers below).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Literal

from annotated_types import Ge, Gt, Le


DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


Positive = Gt(0)
NonNegative = Ge(0)
Port = Annotated[int, Ge(0), Le(65535)]
"""A TCP port; 0: any free one."""
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Quantization = Literal["fp8", "int8", "int4"]
AttentionBackend = Literal["auto", "torch", "triton"]
LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["text", "json"]
"""`text`: one human line per record; `json`: one JSON object per line (`tidal.logs`)."""
ToolCallParserName = Literal["auto", "hermes", "llama3_json", "harmony"]
ReasoningParserName = Literal["none", "qwen3", "deepseek_r1", "harmony"]


@functools.cache
def _hints(cls: type) -> dict[str, object]:
    return typing.get_type_hints(cls, include_extras=True)


def _check(where: str, hint: object, value: object) -> None:
    if value is None:
        return
    if typing.get_origin(hint) is Annotated:
        base, *metadata = typing.get_args(hint)
        for bound in metadata:
            if isinstance(bound, Gt) and not value > bound.gt:
                raise ValueError(f"{where} must be greater than {bound.gt}, got {value!r}")
            if isinstance(bound, Ge) and not value >= bound.ge:
                raise ValueError(f"{where} must be at least {bound.ge}, got {value!r}")
            if isinstance(bound, Le) and not value <= bound.le:
                raise ValueError(f"{where} must be at most {bound.le}, got {value!r}")
        _check(where, base, value)
    elif typing.get_origin(hint) in (typing.Union, types.UnionType):
        for arm in typing.get_args(hint):
            if arm is not type(None):
                _check(where, arm, value)
    elif typing.get_origin(hint) is Literal and value not in typing.get_args(hint):
        raise ValueError(f"{where} must be one of {', '.join(map(repr, typing.get_args(hint)))}, got {value!r}")


def validate_fields(config) -> None:
    """Check a config dataclass's values against the bounds and choices its annotations state."""
    for f in dataclasses.fields(config):
        _check(f.name, _hints(type(config))[f.name], getattr(config, f.name))


def env_str(name: str, default: str | None = None) -> str | None:
    """The one place the package reads environment variables."""
    return os.environ.get(name, default)


API_KEY_ENV = "TIDAL_API_KEY"


def env_api_keys() -> tuple[str, ...]:
    """The API keys `TIDAL_API_KEY` holds (several separated by commas); () when unset."""
    return tuple(key.strip() for key in (env_str(API_KEY_ENV) or "").split(",") if key.strip())


@dataclass(frozen=True)
class ModelConfig:
    model: str | None = None
    """GGUF file, Hugging Face folder, `dummy:ARCH`, or None for the embedded SmolLM2."""
    tokenizer: str | None = None
    """A folder with tokenizer.json or a .gguf file, instead of the model's own tokenizer."""
    served_model_name: str | None = None
    """Name clients use in the `model` field; defaults to the model's own name."""
    dtype: Dtype = "auto"
    """`float32`, `bfloat16`, `float16` or `auto` (float32 on CPU, bfloat16 on CUDA)."""
    device: str = "cpu"
    """`cpu` or `cuda` (or `cuda:N`)."""
    max_model_len: Annotated[int, Positive] | None = None
    """Longest prompt + output in tokens; defaults to the model's context length."""
    seed: int = 0
    """Seed for dummy weights and for requests that don't carry one."""
    quantization: Quantization | None = None
    """`fp8`: the decoder's dense linears in FP8 e4m3 with a scale per output row, quantized at load
    from a float checkpoint or drawn so by `dummy:` (an FP8 checkpoint is served in FP8 without it).
    `int8` / `int4`: CPU weight-only linears (`tidal.models.cpu_quant`); int4 keeps a Q4 GGUF's blocks."""

    def __post_init__(self) -> None:
        validate_fields(self)


@dataclass(frozen=True)
class CacheConfig:
    block_size: Annotated[int, Positive] = 16
    """Tokens per KV block."""
    num_blocks: Annotated[int, Positive] | None = None
    """KV blocks in the pool; None: size from `kv_cache_memory_bytes`."""
    kv_cache_memory_bytes: Annotated[int, Positive] = 1 << 30
    """Memory given to the KV cache when `num_blocks` is None."""
    enable_prefix_caching: bool = True
    """Reuse blocks whose chained hash matches a prompt's prefix."""
    gpu_memory_utilization: Annotated[float, Gt(0), Le(1)] | None = None
    """CUDA only: size the KV cache to fill this fraction of the device's total memory, less what this
    process holds once the weights are loaded (vLLM's `--gpu-memory-utilization`, but nothing is set
    aside for activations by profiling: they, CUDA graphs and other processes live in the rest). Wins
    over `kv_cache_memory_bytes`; `num_blocks` wins over it."""

    def __post_init__(self) -> None:
        validate_fields(self)


@dataclass(frozen=True)
class SchedulerConfig:
    token_budget: Annotated[int, Positive] = 256
    """Tokens (decode tokens plus prefill chunk tokens) the scheduler may run in one step."""
    max_num_seqs: Annotated[int, Positive] = 128
    """Requests running at once."""
    enable_chunked_prefill: bool = True
    """Split long prompts over several steps; off: a prompt is prefilled whole in one step."""

    def __post_init__(self) -> None:
        validate_fields(self)


@dataclass(frozen=True)
class RunnerConfig:
    attention_backend: AttentionBackend = "auto"
    """`torch` (plain torch, any device), `triton` (the Triton kernels, CUDA) or `auto` (Triton on CUDA
    when it is installed, else torch)."""
    enable_cuda_graphs: bool = True
    """Capture decode steps as CUDA graphs (CUDA with the Triton backend only)."""
    cuda_graph_max_batch: Annotated[int, Positive] = 256
    """Largest decode batch run from a graph; larger batches run eagerly. Capped by `max_num_seqs`."""

    def __post_init__(self) -> None:
        validate_fields(self)


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


MAX_PRIORITY = 1000
"""The largest |priority| a request can carry at all; `ServerConfig.max_request_priority` allows less."""
MAX_N = 128
"""The most choices (`n`, `best_of`) a request can ask for at all; `ServerConfig.max_n` allows less."""
MAX_ABS_PENALTY = 2.0
"""presence_penalty and frequency_penalty lie in [-2, 2] (OpenAI's range)."""
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0
"""repetition_penalty's range: wide enough for any real use, narrow enough that no finite logit becomes
infinite (a logit divided by a vanishing penalty would)."""
MAX_ABS_LOGIT_BIAS = 100.0
"""A logit_bias value lies in [-100, 100] (OpenAI's range: -100 bans a token, 100 all but forces it)."""


@dataclass(frozen=True)
class ServerConfig:
    """The HTTP serving tier: where it listens, how many processes share the port, what it accepts."""

    host: str = "127.0.0.1"
    port: Port = 8000
    api_servers: Annotated[int, Ge(1), Le(64)] | None = None
    """Frontend processes sharing the port, each with its own router replica; None: one per four
    cores (`tidal.deploy.api_servers.default_api_servers`). With 1 the frontend runs in the
    launcher's process."""
    max_request_body_bytes: Annotated[int, Positive] = 8 << 20
    """Bodies larger than this get a 413."""
    prompt_chars_per_token: Annotated[int, Ge(4), Le(1024)] = 32
    """A prompt longer than `max_model_len` x this many characters gets a 400 (context length) before
    it is tokenized: tokenizing megabytes only to refuse them stalls the frontend and grows its
    memory. Ordinary text runs about 4 characters a token, so only a prompt whose tokens average
    more than this (long runs of `#` or spaces) could fit the context and still be refused."""
    default_max_tokens: Annotated[int, Positive] | None = 4096
    """A chat request that names no `max_tokens` generates at most this many tokens (and never more
    than the context leaves), as SGLang and TGI cap it; None: to the end of the context. Text
    completions default to OpenAI's 16, within this cap."""
    request_deadline_s: Annotated[float, Positive] | None = 600.0
    """A request still generating this long after it arrived is ended: a 408 (`request_timeout`), or
    that error as the last event of a stream, and the engine frees its KV. None: no deadline."""
    parse_special_tokens_in_content: bool = False
    """Off: special-token text in chat message content, tool definitions and template arguments
    (`<|im_end|>` typed by a user) is tokenized as plain text, so only the chat template writes
    control tokens. On: it becomes the control token, as the whole rendered prompt is tokenized."""
    max_request_header_bytes: Annotated[int, Ge(1024), Le(16 << 20)] = 64 << 10
    """A request line plus headers larger than this gets a 431 (the connection is then closed)."""
    max_request_priority: Annotated[int, NonNegative, Le(MAX_PRIORITY)] = 0
    """Clients may set `priority` within [-N, N] (higher is admitted first when requests queue);
    outside it: 400. The default 0 lets no client jump the queue (per-API-key limits come with keys)."""
    tool_call_parser: ToolCallParserName = "auto"
    """The format tool calls are read in when `tool_choice` is "auto": `hermes` (<tool_call> JSON
    </tool_call>: Qwen, Hermes, and the tool prompt Tidal writes for templates that ignore tools),
    `llama3_json` (Llama 3.x's bare JSON calls), `harmony` (gpt-oss: calls are messages to
    `functions.NAME`, and the reply's channels are read as `reasoning_parser: harmony` reads them),
    `auto` (the one the chat template writes; harmony for a template that writes `<|channel|>`)."""
    reasoning_parser: ReasoningParserName = "none"
    """`qwen3` or `deepseek_r1`: a reply's <think>...</think> goes to `reasoning_content` (see
    `tidal.frontend.reasoning`); `harmony`: gpt-oss's analysis channel goes to `reasoning_content`,
    its final channel to `content` and its calls to `tool_calls` (`tidal.frontend.harmony`; chosen
    by `tool_call_parser: auto` for a harmony template whatever this says); `none`: the reply is
    content as written."""
    max_n: Annotated[int, Ge(1), Le(MAX_N)] = 16
    """The most choices one request may ask for (`n`, and `best_of` for text completions); more: 400.
    Each choice is a request to the engine of its own (sharing the prompt's KV blocks)."""
    log_level: LogLevel = "info"
    log_format: LogFormat = "text"
    """How every process of the deployment writes its log (`tidal.logs`): `text` or `json` lines."""
    log_requests: bool = True
    """One INFO line per finished request on the `tidal.requests` logger (route, worker, token counts,
    TTFT, end-to-end time, finish reason, HTTP status of failures); off: `--disable-log-requests`."""
    response_headers: tuple[tuple[str, str], ...] = ()
    """Sent with every response (an API server names itself: `x-tidal-api-server: INDEX`)."""
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    """Clients must send one of these (`Authorization: Bearer KEY`) on every route but /health, /live,
    /ready, /version and /metrics, else 401; empty: no key needed, and /admin routes then answer
    loopback clients only (403 otherwise). `tidal.deploy.config` fills it from `TIDAL_API_KEY` when
    the config names none."""
    require_api_key_for_metrics: bool = False
    """/metrics needs a key too (when keys are set)."""
    max_requests_per_minute_per_key: Annotated[int, NonNegative] = 0
    """Requests a key may start per minute (a token bucket: bursts up to this many), per frontend
    process; over it: 429 with Retry-After. 0: no limit."""
    max_concurrent_requests_per_key: Annotated[int, NonNegative] = 0
    """Requests of one key open at once (a stream counts until it ends), per frontend process; over
    it: 429. 0: no limit."""
    allowed_origins: tuple[str, ...] = ()
    """CORS: origins browsers may call from (`*`: any); empty: no CORS headers at all."""
    allowed_methods: tuple[str, ...] = ("*",)
    """CORS: methods a cross-origin request may use."""
    allowed_headers: tuple[str, ...] = ("*",)
    """CORS: request headers a cross-origin request may send."""
    allow_credentials: bool = False
    """CORS: browsers may send cookies and HTTP authentication along."""
    ssl_keyfile: str | None = None
    """TLS: the server's private key (PEM); with `ssl_certfile`, the API is served over HTTPS."""
    ssl_certfile: str | None = None
    """TLS: the server's certificate chain (PEM)."""
    ssl_ca_certs: str | None = None
    """TLS: CA certificates that client certificates are checked against (`ssl_cert_reqs`)."""
    ssl_cert_reqs: Annotated[int, Ge(0), Le(2)] = 0
    """TLS: client certificates are 0 not asked for, 1 checked when sent, 2 required (Python's
    `ssl.CERT_NONE`, `CERT_OPTIONAL`, `CERT_REQUIRED`)."""
    chat_template: str | None = None
    """A Jinja chat template (a file, or the template itself) used instead of the model's own."""

    def __post_init__(self) -> None:
        validate_fields(self)
        if (self.ssl_keyfile is None) != (self.ssl_certfile is None):
            raise ValueError("ssl_keyfile and ssl_certfile go together")
        limits = self.max_requests_per_minute_per_key or self.max_concurrent_requests_per_key
        if limits and not self.api_keys:
            raise ValueError("per-key limits need API keys (api_keys, --api-key or TIDAL_API_KEY)")
        if any(not key for key in self.api_keys):
            raise ValueError("an API key must not be empty")

    @property
    def uses_tls(self) -> bool:
        return self.ssl_certfile is not None


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def replace(self, **changes) -> EngineConfig:
        return dataclasses.replace(self, **changes)


SIMULATED_WORKER = EngineConfig(cache=CacheConfig(num_blocks=8192),
                                scheduler=SchedulerConfig(token_budget=2048, max_num_seqs=256))
"""What a simulated worker of `tidal sim` runs with unless told otherwise: a GPU-sized engine (the
simulator models GPU step times), not the CPU-sized defaults above."""
FLEET_PREFILL_TOKEN_BUDGET = 1024
"""A prefill worker's token budget in the fleet simulator (`tidal sim-fleet`): about the knee of the
H200 profile it models."""


@dataclass(frozen=True)
class RoleTuning:
    """How a prefill or decode worker's scheduler limits follow from a `tidal profile` file
    (`resolve_role_limits`); explicit `token_budget`/`max_num_seqs` settings win over it."""

    profile: str | None = None
    """A `tidal profile` file of this model on this device. A prefill worker's token_budget becomes
    the profile's prefill knee and a decode worker's max_num_seqs the largest batch whose step time
    stays within itl_target_ms; role `both` keeps its settings."""
    itl_target_ms: Annotated[float, Positive] | None = None
    """Decode workers tuned from a profile: the inter-token latency (= decode step time) to keep under."""
    tuning_context_len: Annotated[int, Positive] = 2048
    """Decode workers tuned from a profile: the context length (tokens per sequence) at which the
    ITL target must hold."""

    def __post_init__(self) -> None:
        validate_fields(self)


GIB = 1 << 30
ENGINE_KNOBS: dict[str, tuple[type, str]] = {
    "dtype": (ModelConfig, "dtype"), "max_model_len": (ModelConfig, "max_model_len"), "seed": (ModelConfig, "seed"),
    "quantization": (ModelConfig, "quantization"),
    "block_size": (CacheConfig, "block_size"), "num_kv_blocks": (CacheConfig, "num_blocks"),
    "kv_cache_memory_gib": (CacheConfig, "kv_cache_memory_bytes"),  # in GiB (`knob_type`)
    "enable_prefix_caching": (CacheConfig, "enable_prefix_caching"),
    "gpu_memory_utilization": (CacheConfig, "gpu_memory_utilization"),
    "token_budget": (SchedulerConfig, "token_budget"), "max_num_seqs": (SchedulerConfig, "max_num_seqs"),
    "enable_chunked_prefill": (SchedulerConfig, "enable_chunked_prefill"),
    "attention_backend": (RunnerConfig, "attention_backend"), "enable_cuda_graphs": (RunnerConfig, "enable_cuda_graphs"),
    "profile": (RoleTuning, "profile"), "itl_target_ms": (RoleTuning, "itl_target_ms"),
    "tuning_context_len": (RoleTuning, "tuning_context_len"),
}
"""The engine settings a user writes (a deployment's `engine:` section, the engine flags), each
naming the config field it sets; unset (None) knobs keep that field's default."""


def knob_type(name: str) -> object:
    """The type (with bounds and choices) a knob's values take: its field's annotation."""
    if name == "kv_cache_memory_gib":
        return Annotated[float, Positive]
    cls, field_name = ENGINE_KNOBS[name]
    return _hints(cls)[field_name]


def knob_fields(cls: type, knobs: Mapping[str, object]) -> dict[str, object]:
    """The fields of `cls` the set knobs name, with their values (GiB knobs in bytes)."""
    out = {}
    for name, value in knobs.items():
        if value is None or ENGINE_KNOBS[name][0] is not cls:
            continue
        out[ENGINE_KNOBS[name][1]] = int(value * GIB) if name == "kv_cache_memory_gib" else value
    return out


DRAIN_TIMEOUT_S = 300.0
"""A drain (stop routing to a worker, wait until it holds nothing) that takes longer fails."""
WORKER_READY_TIMEOUT_S = 600.0
"""A started or flipped worker that is not routable by then has failed to come up."""
FLEET_READY_TIMEOUT_S = 900.0
"""A router waits this long for its first routable worker (model loads, CUDA graph captures)."""

STOP_GRACE_S = 30.0
"""After SIGTERM a worker takes no new requests and exits once its own are done, or after this long."""
STATS_LOG_INTERVAL_S = 10.0
"""A worker logs a line of its engine's stats (throughput, queue, KV use) this often, when something ran
or changed since its last line; 0: never (`tidal.worker.stats_log`)."""


NAMESPACE_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True)
class EtcdAuth:
    """How a process proves itself to etcd (and checks etcd): a user with a password, read from a
    file (a mounted Kubernetes secret), so the password never sits in a config or a log."""

    user: str | None = None
    """The etcd user (etcd's `auth enable`); None: no authentication."""
    password_file: str | None = None
    """A file holding that user's password (its first line)."""

    def __post_init__(self) -> None:
        if (self.user is None) != (self.password_file is None):
            raise ValueError("etcd_auth: give user and password_file together")


@dataclass(frozen=True)
class NatsAuth:
    """How a process proves itself to NATS and checks it: one of a user with a password, a token, or
    a creds file (JWT and NKey seed), each secret read from a file; TLS files for a `tls://` server."""

    user: str | None = None
    """A NATS user (the server's `authorization { user, password }`)."""
    password_file: str | None = None
    """A file holding that user's password."""
    token_file: str | None = None
    """A file holding the server's authorization token."""
    creds_file: str | None = None
    """A NATS creds file (decentralized JWT auth)."""
    ca_file: str | None = None
    """The CA that signed the NATS server's certificate; given: the connection uses TLS."""
    cert_file: str | None = None
    """This process's client certificate (the server's `verify: true`), with `key_file`."""
    key_file: str | None = None
    """The client certificate's private key."""

    def __post_init__(self) -> None:
        if (self.user is None) != (self.password_file is None):
            raise ValueError("nats_auth: give user and password_file together")
        if sum(x is not None for x in (self.user, self.token_file, self.creds_file)) > 1:
            raise ValueError("nats_auth: choose one of user/password_file, token_file, creds_file")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("nats_auth: give cert_file and key_file together")

    @property
    def uses_tls(self) -> bool:
        return self.ca_file is not None or self.cert_file is not None


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
    curve_key_dir: str | None = None
    """A folder with the cluster's ZMQ CURVE keys (a mounted Kubernetes secret; `python -m
    tidal.cluster.keys DIR` writes one): the request plane, the zmq KV transfer and the ZMQ event
    plane then encrypt every connection and accept only clients whose public key is in it
    (`tidal.curve`); None: plain TCP."""
    etcd_auth: EtcdAuth = field(default_factory=EtcdAuth)
    """etcd credentials."""
    nats_auth: NatsAuth = field(default_factory=NatsAuth)
    """NATS credentials and TLS files."""

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


@dataclass(frozen=True)
class RestartConfig:
    """How `tidal serve` restarts a worker or API server process that exits unexpectedly (a crash,
    a kill; not a stop the launcher or the planner asked for): `tidal.deploy.supervisor.RestartPolicy`."""

    max_restarts: Annotated[int, NonNegative] = 5
    """Restarts of one process within `window_s`; one more exit in the window and it stays down
    (the log says so). 0: never restart."""
    window_s: Annotated[float, Positive] = 300.0
    """The sliding window `max_restarts` counts over; restarts older than this are forgotten."""
    backoff_s: Annotated[float, Positive] = 1.0
    """Delay before the first restart in a window; it doubles with each further one."""
    max_backoff_s: Annotated[float, Positive] = 30.0
    """The longest delay before a restart."""
    jitter: Annotated[float, Ge(0), Le(1)] = 0.5
    """Each delay is shortened by a random fraction up to this (0: exact delays), so processes that
    died together do not restart in lockstep."""

    def __post_init__(self) -> None:
        validate_fields(self)
        if self.max_backoff_s < self.backoff_s:
            raise ValueError(f"max_backoff_s ({self.max_backoff_s}) is less than backoff_s ({self.backoff_s})")
