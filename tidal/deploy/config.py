"""Deployment configs: one YAML file describes the frontend, the router and every worker.

The schema is pydantic models that forbid unknown fields, so a typo or a bad value is refused
with a message naming the field (`workers.1.role: Input should be 'both', 'prefill' or
'decode'`). `load_deployment(path)` reads and validates; `Deployment.engine_config(worker)`
resolves one worker's engine settings (the shared `engine` section, then that worker's
overrides) into the engine's frozen `EngineConfig`; with a `profile` (a `tidal profile` file), a
prefill worker's token budget and a decode worker's sequence cap default to what the profile
says suits the role (`tidal.deploy.engine_knobs.resolve_role_limits`).

The sections are derived from the config dataclasses they set, so every default, bound and choice
is written once, on the dataclass (`section_from`: `frontend` from `ServerConfig`, `RouterConfig`
and `KVWeights`; `disaggregation` from `DisaggPolicy`; `kv_transfer` from `KVTransferConfig`;
`planner` from `PlannerConfig`; `restarts` from `RestartConfig`; `engine` from `tidal.config.ENGINE_KNOBS`), and build them back
field by field without naming a field (`_Section.build`).

    model: null                     # GGUF file, HF folder, dummy:ARCH; null: embedded SmolLM2
    frontend: {host: 127.0.0.1, port: 8000, api_servers: 4, router: kv, max_queue: 1024, queue_timeout_s: 30,
               max_migrations: 3,       # api_servers: frontend processes on the port (default: cores / 4)
               log_format: text, log_requests: true}   # every process's log: text or json; a line per request
                                    # api_keys, per-key limits, CORS, TLS, chat_template: docs/deploy.md, "Security"
    disaggregation: {local_prefill_threshold: 512, max_prefill_queue_tokens: 16384}
    kv_transfer: {backend: auto, timeout_s: 30}
    engine: {dtype: auto, token_budget: 256, kv_cache_memory_gib: 0.5, ...}
    workers:
      - {role: prefill, count: 1, devices: [cpu], stats_log_interval_s: 10, engine: {token_budget: 512}}
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
    restarts:                       # a worker or API server that dies is started again (docs/deploy.md)
      max_restarts: 5               # per process within window_s; past it, it stays down; 0: never restart
      window_s: 300
      backoff_s: 1                  # doubles with each restart in the window, up to max_backoff_s
      max_backoff_s: 30
      jitter: 0.5                   # each delay shortened by a random fraction up to this
"""

from __future__ import annotations

import dataclasses
import logging
import os
import typing
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from tidal.config import (DRAIN_TIMEOUT_S, ENGINE_KNOBS, STATS_LOG_INTERVAL_S, STOP_GRACE_S, EngineConfig,
                          ParallelConfig, RestartConfig, ServerConfig, env_api_keys, knob_type)
from tidal.deploy.engine_knobs import engine_config, resolve_role_limits
from tidal.models.hf_loader import check_not_quantized
from tidal.perf.profile import load_profile
from tidal.planner.actuators import KubernetesConfig
from tidal.planner.types import PlannerConfig
from tidal.protocol import Role
from tidal.router.policy import DisaggPolicy, KVWeights
from tidal.router.config import RouterConfig
from tidal.transfer import KVTransferConfig

logger = logging.getLogger(__name__)

class DeploymentError(ValueError):
    """A deployment config that can't be used; the message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Section(_Strict):
    """A section derived from config dataclasses by `section_from`; `build` makes them back."""

    sources: ClassVar[dict[str, tuple[type, str]]] = {}
    """Each derived field's origin: section field -> (dataclass, its field)."""

    def build(self, cls: type | None = None, **given):
        """The dataclass `cls` (default: the one this section derives from) from this section's
        fields that came from it (a nested section building its own), `given` over them."""
        if cls is None:
            (cls,) = {source for source, _ in self.sources.values()}
        values = {}
        for name, (source, field_name) in self.sources.items():
            if source is cls:
                value = getattr(self, name)
                values[field_name] = value.build() if isinstance(value, _Section) else value
        return cls(**{**values, **given})


def section_from(name: str, *classes: type, rename: Mapping[str, str] | None = None, exclude: Collection[str] = (),
                 only: Collection[str] | None = None, base: type[_Section] = _Section,
                 doc: str | None = None) -> type[_Section]:
    """A YAML section derived from the config dataclasses `classes`: a field per dataclass field
    (all, or `only` those, less `exclude`; named as `rename` says), with its type, bounds, choices
    and default, so each is written once, on the dataclass. A field holding a config dataclass
    becomes a nested section derived from it. `base` brings section-only fields, validators and
    methods."""
    fields, sources = {}, {}
    for cls in classes:
        hints = typing.get_type_hints(cls, include_extras=True)
        for f in dataclasses.fields(cls):
            if f.name in exclude or (only is not None and f.name not in only):
                continue
            key = (rename or {}).get(f.name, f.name)
            if key in fields:
                raise TypeError(f"{name}: two fields named {key!r}")
            kind = hints[f.name]
            default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
            if dataclasses.is_dataclass(kind):
                kind = section_from(f"{kind.__name__}Section", kind)
                default = kind()
            fields[key] = (kind, default)
            sources[key] = (cls, f.name)
    model = create_model(name, __base__=base, __module__=__name__, __doc__=doc, **fields)
    model.sources = {**base.sources, **sources}
    return model


class _FrontendSectionBase(_Section):
    @model_validator(mode="after")
    def _server_config_builds(self):
        """`ServerConfig`'s own checks (TLS files in pairs, limits that need keys) and the chat template,
        at load time rather than when the server starts."""
        from tidal.tokenizer import load_chat_template

        server = server_config_of(self)
        if server.chat_template is not None:
            load_chat_template(server.chat_template)
        return self


FrontendSection = section_from(
    "FrontendSection", ServerConfig, RouterConfig, KVWeights, exclude=("response_headers", "weights", "disagg", "seed"),
    base=_FrontendSectionBase,
    rename={"policy": "router", "overlap_weight": "kv_overlap_weight", "temperature": "kv_temperature"},
    doc="""The HTTP serving tier (`tidal.config.ServerConfig`) and the router (`RouterConfig`; its
    policy as `router`, the kv policy's weights as `kv_overlap_weight` and `kv_temperature`).""")
DisaggSection = section_from("DisaggSection", DisaggPolicy, doc="Conditional disaggregation (`DisaggPolicy`).")
class _RestartsSectionBase(_Section):
    @model_validator(mode="after")
    def _consistent(self):
        self.build()  # `RestartConfig`'s own checks (max_backoff_s >= backoff_s) at load time
        return self


RestartsSection = section_from(
    "RestartsSection", RestartConfig, base=_RestartsSectionBase,
    doc="""How `tidal serve` restarts a worker or API server process that died (`RestartConfig`).""")
KVTransferSection = section_from(
    "KVTransferSection", KVTransferConfig, only=("backend", "timeout_s", "debug_delay_s"),
    doc="The KV transfer settings a user chooses (`KVTransferConfig`; the rest is the process's own).")


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


class WorkerCommon(_Strict):
    """What a worker section of a deployment and the `worker:` section of the cluster commands share."""

    role: Role
    tensor_parallel_size: int = Field(1, ge=1)
    """Devices (processes) each worker spans; its rank 0 runs the engine."""
    num_threads: int | None = Field(None, gt=0)
    """Torch threads per worker; default: the machine's cores shared among CPU workers (a GPU
    worker's own default in cluster mode)."""
    stop_grace_s: float = Field(STOP_GRACE_S, ge=0)
    """After SIGTERM a worker takes no new requests and exits once its own are done, or after this
    long (requests still running then move to other workers)."""
    stats_log_interval_s: float = Field(STATS_LOG_INTERVAL_S, ge=0)
    """Each worker logs a line of its engine's stats (throughput, queue, KV use, prefix hits) this often,
    when it ran or changed since its last line; 0: never."""
    engine: EngineSection | None = None


class WorkerSection(WorkerCommon):
    count: int = Field(1, ge=1, le=64)
    devices: list[str] | None = None
    """One device per replica (`cpu`, `cuda:0`, ...), or `tensor_parallel_size` consecutive devices
    per replica; default: cpu for all."""
    health_port: int | None = Field(None, ge=1, le=65535)
    """Each worker of this group serves /live and /health over HTTP (Kubernetes probes), replica i
    on health_port + i; default: no health endpoint (the frontend's /health covers a local deployment)."""

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


KubernetesSection = section_from("KubernetesSection", KubernetesConfig, exclude=("timeout_s",))


class _PlannerSectionBase(_Section):
    """What a planner section has beyond `PlannerConfig`: how it acts and what it knows."""

    devices: list[str] = []
    """Free devices for workers the planner adds (one each); empty: CPU workers."""
    actuator: Literal["local", "kubernetes"] = "local"
    kubernetes: KubernetesSection = KubernetesSection()
    drain_timeout_s: float = Field(DRAIN_TIMEOUT_S, gt=0)
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
    def _fits_budget(self):
        if self.min_prefill + self.min_decode > self.max_workers:
            raise ValueError(f"min_prefill + min_decode = {self.min_prefill + self.min_decode} exceeds "
                             f"max_workers = {self.max_workers}")
        return self

    def planner_config(self) -> PlannerConfig:
        return self.build(PlannerConfig)


PlannerSection = section_from("PlannerSection", PlannerConfig, base=_PlannerSectionBase,
                              doc="The SLA planner: `PlannerConfig` (its `slo` nested) and how it acts.")


def server_config_of(frontend: FrontendSection, **given) -> ServerConfig:
    """The `ServerConfig` a frontend section describes, `given` over it; API keys from
    `TIDAL_API_KEY` when the section names none."""
    keys = {} if frontend.api_keys or "api_keys" in given else {"api_keys": env_api_keys()}
    return frontend.build(ServerConfig, **{**keys, **given})


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

    @field_validator("model")
    @classmethod
    def _model_not_quantized(cls, model: str | None) -> str | None:
        """A quantized Hugging Face checkpoint is refused here, by name, before any worker starts."""
        if model is not None and os.path.isfile(os.path.join(os.path.expanduser(model), "config.json")):
            check_not_quantized(os.path.expanduser(model))
        return model


class Deployment(ServingSections):
    workers: list[WorkerSection] = Field(min_length=1)
    planner: PlannerSection | None = None
    restarts: RestartsSection = RestartsSection()

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
    def _kv_sizing_fits_devices(self) -> Deployment:
        for i, (_, section, devices) in enumerate(self.worker_groups()):
            knobs = self.engine.merged(section.engine)
            if knobs.gpu_memory_utilization is None:
                continue
            if knobs.kv_cache_memory_gib is not None:
                raise ValueError(f"workers.{i}: set gpu_memory_utilization or kv_cache_memory_gib, not both")
            if any(not device.startswith("cuda") for device in devices):
                raise ValueError(f"workers.{i}: gpu_memory_utilization sizes a CUDA device's KV cache, and this "
                                 f"worker runs on {devices[0]}: choose a CUDA device (--device cuda) or set "
                                 "kv_cache_memory_gib (--kv-cache-memory GiB) instead")
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
        return server_config_of(f, host=host or f.host, port=f.port if port is None else port)

    def router_config(self) -> RouterConfig:
        f = self.frontend
        return f.build(RouterConfig, seed=self.engine.seed or 0, weights=f.build(KVWeights),
                       disagg=self.disaggregation.build())

    def transfer_config(self, scratch_dir: str) -> KVTransferConfig:
        return self.kv_transfer.build(scratch_dir=scratch_dir)


def redacted(dump: dict) -> dict:
    """A config's `model_dump` fit for the log: API keys masked."""
    frontend = dump.get("frontend")
    if isinstance(frontend, dict) and frontend.get("api_keys"):
        return {**dump, "frontend": {**frontend, "api_keys": ["***"] * len(frontend["api_keys"])}}
    return dump


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
