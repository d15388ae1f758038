"""Deployment configs: one YAML file describes the frontend, the router and every worker.

The schema is pydantic models that forbid unknown fields, so a typo or a bad value is refused
with a message naming the field (`workers.1.role: Input should be 'both', 'prefill' or
'decode'`). `load_deployment(path)` reads and validates; `Deployment.engine_config(worker)`
resolves one worker's engine settings (the shared `engine` section, then that worker's
overrides) into the engine's frozen `EngineConfig`; with a `profile` (a `tidal profile` file), a
prefill worker's token budget and a decode worker's sequence cap default to what the profile
says suits the role (`tidal.deploy.engine_knobs.resolve_role_limits`). The `engine` section is derived from
`tidal.config.ENGINE_KNOBS`: its fields, types and bounds are the config dataclasses' own.

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

import dataclasses
import logging
import typing
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from tidal.config import ENGINE_KNOBS, STOP_GRACE_S, EngineConfig, ParallelConfig, ServerConfig, knob_type
from tidal.deploy.engine_knobs import engine_config, resolve_role_limits
from tidal.perf.profile import load_profile
from tidal.planner.types import SLO, PlannerConfig
from tidal.protocol import Role
from tidal.router.policy import DisaggPolicy, KVWeights
from tidal.router.config import RouterConfig
from tidal.transfer import KVTransferConfig

logger = logging.getLogger(__name__)

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


def section_from(cls: type, name: str, *, optional: bool = False, rename: dict[str, str] | None = None,
                 exclude: tuple[str, ...] = (), base: type[BaseModel] = _Strict) -> type[BaseModel]:
    """A YAML section derived from the config dataclass `cls`: a field per dataclass field (named as
    `rename` says), with its type, bounds and choices; its default too, unless `optional`, where
    every field defaults to None: "not set here, keep the dataclass's default"."""
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {}
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        fields[(rename or {}).get(f.name, f.name)] = (
            (typing.Optional[hints[f.name]], None) if optional else (hints[f.name], default))
    return create_model(name, __base__=base, __module__=__name__, **fields)


class _EngineKnobs(_Strict):
    """The engine settings of a deployment (`engine:`, and a worker's own `engine:` over it): every
    knob of `tidal.config.ENGINE_KNOBS`, None meaning "the config's default"."""

    def merged(self, override: EngineSection | None) -> EngineSection:
        if override is None:
            return self
        return self.model_copy(update=override.model_dump(exclude_none=True))

    def knobs(self) -> dict[str, object]:
        return self.model_dump()


EngineSection = create_model("EngineSection", __base__=_EngineKnobs, __module__=__name__,
                             **{name: (typing.Optional[knob_type(name)], None) for name in ENGINE_KNOBS})


class WorkerSection(_Strict):
    role: Role
    count: int = Field(1, ge=1, le=64)
    devices: list[str] | None = None
    """One device per replica (`cpu`, `cuda:0`, ...), or `tensor_parallel_size` consecutive devices
    per replica; default: cpu for all."""
    tensor_parallel_size: int = Field(1, ge=1)
    """Devices (processes) each worker of this group spans; its rank 0 runs the engine."""
    num_threads: int | None = Field(None, gt=0)
    """Torch threads per worker; default: the machine's cores shared among CPU workers."""
    stop_grace_s: float = Field(STOP_GRACE_S, ge=0)
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
                resolve_role_limits(section.role, self.engine.merged(section.engine).knobs())
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
        tp = section.tensor_parallel_size
        return engine_config(self.engine.merged(section.engine).knobs(), section.role,
                             ParallelConfig(tensor_parallel_size=tp, devices=tuple(devices) if tp > 1 else ()),
                             model=self.model, tokenizer=self.tokenizer, served_model_name=self.served_model_name,
                             device=device)

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
