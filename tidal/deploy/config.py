"""Deployment configs: one YAML file describes the frontend, the router and every worker.

The schema is pydantic models that forbid unknown fields, so a typo or a bad value is refused
with a message naming the field (`workers.1.role: Input should be 'both', 'prefill' or
'decode'`). `load_deployment(path)` reads and validates; `Deployment.engine_config(worker)`
resolves one worker's engine settings (the shared `engine` section, then that worker's
overrides) into the engine's frozen `EngineConfig`; with a `profile` (a `tidal profile` file), a
prefill worker's token budget and a decode worker's sequence cap default to what the profile
says suits the role (`resolve_role_limits`).

    model: null                     # GGUF file, HF folder, dummy:ARCH; null: embedded SmolLM2
    frontend: {host: 127.0.0.1, port: 8000, api_servers: 4, router: kv, max_queue: 1024, queue_timeout_s: 30,
               max_migrations: 3}       # api_servers: frontend processes on the port (default: cores / 4)
    disaggregation: {local_prefill_threshold: 512, max_prefill_queue_tokens: 16384}
    kv_transfer: {backend: auto, timeout_s: 30}
    engine: {dtype: auto, token_budget: 256, kv_cache_memory_gib: 0.5, ...}
    workers:
      - {role: prefill, count: 1, devices: [cpu], engine: {token_budget: 512}}
      - {role: decode, count: 1, stop_grace_s: 30, engine: {profile: profile.json, itl_target_ms: 50}}
      # or, one worker over 4 GPUs (tensor parallel; aggregated only, for now):
      - {role: both, count: 1, tensor_parallel_size: 4, devices: [cuda:0, cuda:1, cuda:2, cuda:3]}
    planner:                        # optional: `tidal serve` runs the SLA planner (docs/planner.md)
      slo: {ttft_ms: 1000, itl_ms: 50}
      max_workers: 4                # the budget: prefill + decode workers never exceed it
      min_prefill: 0
      min_decode: 1
      devices: [cuda:2, cuda:3]     # free devices for added workers (CPU workers need none)
      actuator: local               # or kubernetes (+ kubernetes: {namespace, prefill_deployment, ...})
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tidal.config import (CacheConfig, EngineConfig, ModelConfig, ParallelConfig, RunnerConfig, SchedulerConfig,
                          ServerConfig)
from tidal.perf.profile import load_profile
from tidal.planner.types import SLO, PlannerConfig
from tidal.router.policy import DisaggPolicy, KVWeights
from tidal.router.service import RouterConfig
from tidal.transfer import KVTransferConfig

logger = logging.getLogger(__name__)

DEFAULT_TUNING_CONTEXT_LEN = 2048


class DeploymentError(ValueError):
    """A deployment config that can't be used; the message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FrontendSection(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_servers: int | None = Field(None, ge=1, le=64)
    """Frontend processes sharing the port, each with its own router replica; None: one per four
    cores (1 on a 2-core box). With 1 the frontend runs in the launcher's process."""
    router: Literal["round_robin", "random", "least_loaded", "kv"] = "round_robin"
    kv_overlap_weight: float = Field(1.0, ge=0)
    """kv router: weight of a worker's prefill work (this prompt's uncached blocks plus its
    pending prefill) against its decode load (active blocks)."""
    kv_temperature: float = Field(0.0, ge=0)
    """kv router: 0 picks the cheapest worker; above 0 samples (softmax over normalized costs)."""
    max_pending_prefill_tokens: int = Field(32768, gt=0)
    """Per worker: with this many prompt tokens waiting for their first token it takes no more;
    when every worker is there, requests queue in the router."""
    max_queue: int = Field(1024, ge=0)
    """Requests that may wait in the router; beyond it they get 503 with Retry-After."""
    queue_timeout_s: float = Field(30.0, gt=0)
    """A request that waited this long gets 503 with Retry-After."""
    max_migrations: int = Field(3, ge=0)
    """Times a request may move to another worker when its worker dies or leaves mid-stream (the
    prompt plus the tokens streamed so far go to the new one); past that the client gets the error."""
    max_request_body_bytes: int = Field(8 << 20, gt=0)
    log_level: Literal["debug", "info", "warning", "error"] = "info"


class DisaggSection(_Strict):
    local_prefill_threshold: int = Field(512, ge=0)
    """Prompts with fewer uncached tokens prefill on their decode worker."""
    max_prefill_queue_tokens: int = Field(16384, gt=0)
    """When every prefill worker has this many prompt tokens pending, prefill locally."""


class KVTransferSection(_Strict):
    backend: Literal["auto", "shm", "zmq", "cuda_ipc", "fake"] = "auto"
    timeout_s: float = Field(30.0, gt=0)
    debug_delay_s: float = Field(0.0, ge=0)
    """Fault testing: every pull waits this long."""


class EngineSection(_Strict):
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = None
    max_model_len: int | None = Field(None, gt=0)
    seed: int | None = None
    block_size: int | None = Field(None, gt=0)
    num_kv_blocks: int | None = Field(None, gt=0)
    kv_cache_memory_gib: float | None = Field(None, gt=0)
    enable_prefix_caching: bool | None = None
    token_budget: int | None = Field(None, gt=0)
    max_num_seqs: int | None = Field(None, gt=0)
    enable_chunked_prefill: bool | None = None
    attention_backend: Literal["auto", "torch", "triton"] | None = None
    enable_cuda_graphs: bool | None = None
    profile: str | None = None
    """A `tidal profile` file of this model on this device. Unless set explicitly, a prefill worker's
    token_budget becomes the profile's prefill knee and a decode worker's max_num_seqs the largest
    batch whose step time stays within itl_target_ms; role `both` keeps its settings."""
    itl_target_ms: float | None = Field(None, gt=0)
    """Decode workers tuned from a profile: the inter-token latency (= decode step time) to keep under."""
    tuning_context_len: int | None = Field(None, gt=0)
    """Decode workers tuned from a profile: the context length (tokens per sequence) at which the
    ITL target must hold; default 2048."""

    def merged(self, override: EngineSection | None) -> EngineSection:
        if override is None:
            return self
        return self.model_copy(update=override.model_dump(exclude_none=True))


class WorkerSection(_Strict):
    role: Literal["both", "prefill", "decode"]
    count: int = Field(1, ge=1, le=64)
    devices: list[str] | None = None
    """One device per replica (`cpu`, `cuda:0`, ...), or `tensor_parallel_size` consecutive devices
    per replica; default: cpu for all."""
    tensor_parallel_size: int = Field(1, ge=1)
    """Devices (processes) each worker of this group spans; its rank 0 runs the engine."""
    num_threads: int | None = Field(None, gt=0)
    """Torch threads per worker; default: the machine's cores shared among CPU workers."""
    stop_grace_s: float = Field(30.0, ge=0)
    """After SIGTERM a worker takes no new requests and exits once its own are done, or after this
    long (requests still running then move to other workers)."""
    health_port: int | None = Field(None, ge=1, le=65535)
    """Each worker of this group serves /live and /health over HTTP (Kubernetes probes), replica i
    on health_port + i; default: no health endpoint (the frontend's /health covers a local deployment)."""
    engine: EngineSection | None = None

    @model_validator(mode="after")
    def _devices_match_count(self) -> WorkerSection:
        tp = self.tensor_parallel_size
        if self.devices is not None and len(self.devices) != self.count * tp:
            per_worker = f" x tensor_parallel_size={tp} (each worker takes {tp} consecutive devices)" if tp > 1 else ""
            raise ValueError(f"devices lists {len(self.devices)} devices for count={self.count} workers{per_worker}")
        if tp > 1 and self.role != "both":
            raise ValueError(f"tensor_parallel_size={tp} with role {self.role!r}: tensor-parallel workers run "
                             f"aggregated for now (role both)")
        for device in self.devices or ():
            if device != "cpu" and not (device == "cuda" or device.startswith("cuda:")):
                raise ValueError(f"device {device!r} is neither cpu nor cuda[:N]")
        return self


class SLOSection(_Strict):
    ttft_ms: float = Field(1000.0, gt=0)
    itl_ms: float = Field(50.0, gt=0)


class KubernetesSection(_Strict):
    namespace: str = "default"
    prefill_deployment: str = "tidal-prefill"
    decode_deployment: str = "tidal-decode"
    base_url: str | None = None
    """The API server; default: the in-cluster one (KUBERNETES_SERVICE_HOST/PORT), with the pod's
    service-account token and CA."""
    token: str | None = None


class PlannerSection(_Strict):
    slo: SLOSection = SLOSection()
    max_workers: int = Field(8, ge=1)
    min_prefill: int = Field(0, ge=0)
    min_decode: int = Field(1, ge=1)
    reactive_interval_s: float = Field(2.0, gt=0)
    predictive_interval_s: float = Field(30.0, gt=0)
    predictor: Literal["moving_average", "holt", "seasonal", "arima"] = "seasonal"
    headroom: float = Field(0.15, ge=0)
    worker_startup_s: float = Field(30.0, gt=0)
    backlog_clear_s: float = Field(20.0, gt=0)
    scale_down_cooldown_s: float = Field(30.0, ge=0)
    allow_flips: bool = True
    decode_prefill_share: float = Field(0.25, ge=0, le=1)
    """With min_prefill 0 and the budget short: the last prefill worker may become a decode worker
    when its prefill need is at most this share of the decode workers (they prefill locally)."""
    devices: list[str] = []
    """Free devices for workers the planner adds (one each); empty: CPU workers."""
    actuator: Literal["local", "kubernetes"] = "local"
    kubernetes: KubernetesSection = KubernetesSection()
    drain_timeout_s: float = Field(300.0, gt=0)
    """A drain (before a removal or flip) that takes longer fails the action; the worker rejoins."""
    profile: str | None = None
    """A `tidal profile` JSON of the workers' model and card: the planner's performance model
    (prefill rate at the knee, decode batch within the ITL target); default: the linear model,
    corrected online by the step times the workers report."""

    def make_planner(self):
        """The pure planner core this section describes (with its profile's performance model)."""
        from tidal.planner.core import Planner
        from tidal.planner.perf_model import PerfModel

        perf = PerfModel.from_profile(load_profile(self.profile)) if self.profile is not None else None
        return Planner(self.planner_config(), perf)

    @model_validator(mode="after")
    def _fits_budget(self) -> PlannerSection:
        if self.min_prefill + self.min_decode > self.max_workers:
            raise ValueError(f"min_prefill + min_decode = {self.min_prefill + self.min_decode} exceeds "
                             f"max_workers = {self.max_workers}")
        return self

    def planner_config(self) -> PlannerConfig:
        return PlannerConfig(slo=SLO(ttft_ms=self.slo.ttft_ms, itl_ms=self.slo.itl_ms), max_workers=self.max_workers,
                             min_prefill=self.min_prefill, min_decode=self.min_decode,
                             reactive_interval_s=self.reactive_interval_s,
                             predictive_interval_s=self.predictive_interval_s, predictor=self.predictor,
                             headroom=self.headroom, scale_down_cooldown_s=self.scale_down_cooldown_s,
                             worker_startup_s=self.worker_startup_s, backlog_clear_s=self.backlog_clear_s,
                             allow_flips=self.allow_flips, decode_prefill_share=self.decode_prefill_share)


class ServingSections(_Strict):
    """What every serving config has: the model, the frontend and router, disaggregation, KV
    transfer and engine defaults (a deployment adds its workers; the cluster commands' file its
    `cluster:` and `worker:` sections)."""

    model: str | None = None
    tokenizer: str | None = None
    served_model_name: str | None = None
    frontend: FrontendSection = FrontendSection()
    disaggregation: DisaggSection = DisaggSection()
    kv_transfer: KVTransferSection = KVTransferSection()
    engine: EngineSection = EngineSection()


class Deployment(ServingSections):
    workers: list[WorkerSection] = Field(min_length=1)
    planner: PlannerSection | None = None

    @model_validator(mode="after")
    def _roles_make_sense(self) -> Deployment:
        roles = {w.role for w in self.workers}
        if "prefill" in roles and not roles & {"decode", "both"}:
            raise ValueError("prefill workers need at least one decode (or both) worker to hand requests to")
        if "prefill" in roles and any(w.tensor_parallel_size > 1 for w in self.workers):
            raise ValueError("tensor-parallel workers run aggregated for now: they can't take KV from prefill "
                             "workers, so a deployment with prefill workers can't have them")
        return self

    @model_validator(mode="after")
    def _profiles_resolve(self) -> Deployment:
        for i, section in enumerate(self.workers):
            try:
                resolve_role_limits(section.role, self.engine.merged(section.engine))
            except ValueError as exc:
                raise ValueError(f"workers.{i} ({section.role}): {exc}") from None
        return self

    # ---- resolution ------------------------------------------------------------------------
    def replicas(self) -> list[tuple[str, WorkerSection, str]]:
        """(worker_id, its section, its device: rank 0's) for every worker, in config order."""
        return [(worker_id, section, devices[0]) for worker_id, section, devices in self.worker_groups()]

    def worker_groups(self) -> list[tuple[str, WorkerSection, tuple[str, ...]]]:
        """(worker_id, its section, the devices of its tensor-parallel ranks) for every worker."""
        out, seen = [], {}
        for section in self.workers:
            tp = section.tensor_parallel_size
            for i in range(section.count):
                n = seen.get(section.role, 0)
                seen[section.role] = n + 1
                devices = tuple(section.devices[i * tp:(i + 1) * tp]) if section.devices else ("cpu",) * tp
                out.append((f"{section.role}-{n}", section, devices))
        return out

    def engine_config(self, section: WorkerSection, device: str, devices: tuple[str, ...] = ()) -> EngineConfig:
        """One worker's engine settings; `device` is its rank 0's, `devices` every rank's (default:
        `rank_devices(device, tensor_parallel_size)`)."""
        e = self.engine.merged(section.engine)
        cache_defaults, sched_defaults = CacheConfig(), SchedulerConfig()
        limits = resolve_role_limits(section.role, e)
        if limits.derived:
            _log_once(f"{section.role} workers: {limits.derived}")
        return EngineConfig(
            model=ModelConfig(model=self.model, tokenizer=self.tokenizer, served_model_name=self.served_model_name,
                              dtype=e.dtype or "auto", device=device, max_model_len=e.max_model_len,
                              seed=e.seed or 0),
            cache=CacheConfig(
                block_size=e.block_size or cache_defaults.block_size, num_blocks=e.num_kv_blocks,
                kv_cache_memory_bytes=int(e.kv_cache_memory_gib * (1 << 30)) if e.kv_cache_memory_gib
                else cache_defaults.kv_cache_memory_bytes,
                enable_prefix_caching=cache_defaults.enable_prefix_caching if e.enable_prefix_caching is None
                else e.enable_prefix_caching),
            scheduler=SchedulerConfig(
                token_budget=limits.token_budget, max_num_seqs=limits.max_num_seqs,
                enable_chunked_prefill=sched_defaults.enable_chunked_prefill if e.enable_chunked_prefill is None
                else e.enable_chunked_prefill),
            runner=RunnerConfig(
                attention_backend=e.attention_backend or "auto",
                enable_cuda_graphs=True if e.enable_cuda_graphs is None else e.enable_cuda_graphs),
            parallel=ParallelConfig(tensor_parallel_size=section.tensor_parallel_size,
                                    devices=tuple(devices) if section.tensor_parallel_size > 1 else ()))

    def server_config(self, host: str | None = None, port: int | None = None) -> ServerConfig:
        f = self.frontend
        return ServerConfig(host=host or f.host, port=f.port if port is None else port,
                            max_request_body_bytes=f.max_request_body_bytes, log_level=f.log_level)

    def router_config(self) -> RouterConfig:
        d = self.disaggregation
        f = self.frontend
        return RouterConfig(policy=f.router, seed=self.engine.seed or 0,
                            weights=KVWeights(overlap_weight=f.kv_overlap_weight, temperature=f.kv_temperature),
                            max_pending_prefill_tokens=f.max_pending_prefill_tokens, max_queue=f.max_queue,
                            queue_timeout_s=f.queue_timeout_s, max_migrations=f.max_migrations,
                            disagg=DisaggPolicy(local_prefill_threshold=d.local_prefill_threshold,
                                                max_prefill_queue_tokens=d.max_prefill_queue_tokens))

    def transfer_config(self, scratch_dir: str) -> KVTransferConfig:
        t = self.kv_transfer
        return KVTransferConfig(backend=t.backend, timeout_s=t.timeout_s, debug_delay_s=t.debug_delay_s,
                                scratch_dir=scratch_dir)


@dataclass(frozen=True)
class RoleLimits:
    token_budget: int
    max_num_seqs: int
    derived: str | None = None
    """What came from a profile, and why, for the log; None when nothing did."""


def resolve_role_limits(role: str, e: EngineSection) -> RoleLimits:
    """One worker's token_budget and max_num_seqs. Explicit settings win; else, with a profile:
    - prefill: token_budget = the profile's prefill knee, the smallest batch that saturates the
      device (larger ones add TTFT for little throughput);
    - decode: max_num_seqs = the largest batch whose decode step, at `tuning_context_len` tokens of
      context, stays within `itl_target_ms`;
    else (and for role `both`) the engine defaults. Raises ValueError for an unreadable profile, a
    decode worker without itl_target_ms, or a target that even batch 1 misses."""
    defaults = SchedulerConfig()
    token_budget, max_num_seqs, derived = e.token_budget, e.max_num_seqs, None
    if e.profile is not None and role == "prefill" and token_budget is None:
        token_budget = load_profile(e.profile).prefill_knee_tokens()
        derived = f"token_budget={token_budget}, the prefill knee of {e.profile}"
    elif e.profile is not None and role == "decode" and max_num_seqs is None:
        if e.itl_target_ms is None:
            raise ValueError(f"a decode worker tuned from a profile ({e.profile}) needs engine.itl_target_ms")
        context_len = e.tuning_context_len or DEFAULT_TUNING_CONTEXT_LEN
        max_num_seqs = load_profile(e.profile).max_decode_batch(e.itl_target_ms, context_len)
        derived = (f"max_num_seqs={max_num_seqs}, the largest batch of {e.profile} within "
                   f"itl_target_ms={e.itl_target_ms:g} at context {context_len}")
    token_budget = token_budget or defaults.token_budget
    if derived and role == "decode" and max_num_seqs > token_budget:
        derived += f" (but token_budget={token_budget} caps a step's batch lower)"
    return RoleLimits(token_budget, max_num_seqs or defaults.max_num_seqs, derived)


@functools.cache
def _log_once(message: str) -> None:
    logger.info(message)


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid deployment config"]
    for err in exc.errors():
        where = ".".join(str(part) for part in err["loc"]) or "(top level)"
        lines.append(f"  {where}: {err['msg']}")
    return "\n".join(lines)


def parse_deployment(data: object, source: str = "config") -> Deployment:
    if not isinstance(data, dict):
        raise DeploymentError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return Deployment.model_validate(data)
    except ValidationError as exc:
        raise DeploymentError(format_validation_error(exc, source)) from None


def load_deployment(path: str | Path) -> Deployment:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise DeploymentError(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise DeploymentError(f"{path}: not valid YAML: {exc}") from None
    return parse_deployment(data, str(path))
