"""Every message that crosses a process boundary, as msgspec Structs.

These types are the request plane's vocabulary: the frontend sends `AddRequest` and
`AbortRequest` to a worker; the worker answers with batches of `TokenDelta`. They are plain
values (no tensors, no callables) so that msgspec can encode them without pickle.
"""

from __future__ import annotations

from typing import Literal

import msgspec

Role = Literal["both", "prefill", "decode"]
"""What a worker does: `both` runs requests whole (aggregated); `prefill` computes prompts and holds
their KV for a decode worker; `decode` pulls that KV and generates the rest."""
ROLES: tuple[Role, ...] = ("both", "prefill", "decode")


StructuredKind = Literal["json", "json_object", "regex", "choice", "grammar"]


class StructuredOutput(msgspec.Struct, frozen=True, kw_only=True):
    """A constraint on a request's output, enforced token by token in the sampler by a grammar.

    `kind` says what `spec` holds: "json" a JSON schema (its text), "json_object" nothing (any
    JSON object), "regex" a regular expression, "choice" a JSON list of the allowed strings,
    "grammar" a grammar text (the grammar library's syntax)."""

    kind: StructuredKind
    spec: str = ""


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True):
    """How to pick tokens for one request. Stop strings are matched by the detokenizing side."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k cut
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None  # None: none; k: the chosen token's logprob plus top-k
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from every token already in the output
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per occurrence in the output
    repetition_penalty: float = 1.0  # vLLM's: logits of prompt and output tokens divided (> 0) or multiplied (< 0)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    structured: StructuredOutput | None = None  # the output must match this (None: free text)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 1e-5 or self.top_k == 1


class KVLayout(msgspec.Struct, frozen=True, kw_only=True):
    """Shape of a worker's whole KV cache: one tensor
    [num_layers, 2 (k, v), num_kv_heads, num_blocks, block_size, head_dim] of `dtype`."""

    num_layers: int
    num_kv_heads: int
    num_blocks: int
    block_size: int
    head_dim: int
    dtype: str  # torch dtype name without the prefix: "float32", "bfloat16", "float16"

    @property
    def shape(self) -> tuple[int, int, int, int, int, int]:
        return (self.num_layers, 2, self.num_kv_heads, self.num_blocks, self.block_size, self.head_dim)


class KVSourceInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What a peer needs to read this worker's KV cache with the named transfer backend."""

    backend: str  # "fake" | "shm" | "zmq" | "cuda_ipc"
    worker_id: str
    pid: int
    layout: KVLayout
    address: str = ""  # shm: file path; zmq: the KV server's endpoint
    device_index: int = -1  # cuda_ipc: the GPU holding the cache
    handle: list[int | bytes | bool | None] = []  # cuda_ipc: torch's IPC handle of the cache storage


class KVTransferParams(msgspec.Struct, frozen=True, kw_only=True):
    """Where a finished remote prefill left its KV: the prefill worker holds `block_ids`
    (covering the first `num_tokens` tokens) until it gets `ReleaseKV` or its hold times out."""

    source: KVSourceInfo
    block_ids: list[int]
    num_tokens: int
    release_addr: str  # the prefill worker's request-plane endpoint


class RoutingHints(msgspec.Struct, frozen=True, kw_only=True):
    """Per-request routing options from the client (the router reads them; workers ignore them)."""

    session_id: str | None = None  # keep a conversation on its worker (x-session-id header or `user`)
    priority: int = 0  # higher is admitted first when requests queue in the router
    overlap_weight: float | None = None  # kv policy: weight of prefill work against decode load
    temperature: float | None = None  # kv policy: 0 picks the cheapest worker; > 0 samples


class AddRequest(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float = 0.0
    # Disaggregation. A prefill worker given `hold_kv` keeps the request's blocks after its one
    # token and reports them in the finished delta's `kv_transfer_params`. A decode worker given
    # `kv_transfer_params` pulls that KV instead of computing the prompt; `output_token_ids`
    # are the tokens the prefill worker already produced (the first one).
    hold_kv: bool = False
    kv_transfer_params: KVTransferParams | None = None
    output_token_ids: list[int] = []
    routing: RoutingHints | None = None
    # Migration. The prompt's last `num_resumed_tokens` are this request's own output, sampled on a
    # worker that went away; a seeded request skips that many draws so its random stream continues.
    num_resumed_tokens: int = 0


class AbortRequest(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    request_id: str


class ReleaseKV(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """A decode worker has pulled (or given up on) a request's KV: the prefill worker frees it."""

    request_id: str


class KVDumpRequest(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """A router asks a worker for every block hash it holds (resync); the answer is a `KVDump`."""


class Connect(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """A client's first message on a worker's request socket; the worker answers WorkerReady."""

    client_id: str


class TokenLogprob(msgspec.Struct, frozen=True, array_like=True):
    """The sampled token's logprob and the top-k alternatives, as (token_id, logprob) pairs."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


class TokenDelta(msgspec.Struct, frozen=True, kw_only=True, array_like=True):
    """New tokens for one request from one engine step."""

    request_id: str
    new_token_ids: list[int]
    finished: bool = False
    # "stop" (eos or stop token), "length" (max_tokens or context), "abort", "error"
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None
    kv_transfer_params: KVTransferParams | None = None
    # On a request's first delta from a worker: seconds it waited for its first step there,
    # and (decode after a remote prefill) seconds its KV pull took.
    queue_s: float | None = None
    kv_transfer_s: float | None = None


class EngineStats(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    prefix_cache_hit_tokens: int
    prompt_tokens: int
    generation_tokens: int
    num_pending_prefill_tokens: int = 0
    num_waiting_for_kv: int = 0  # decode side: requests whose KV is being pulled
    num_held_kv: int = 0  # prefill side: finished prefills whose KV waits for its puller
    kv_transfers: int = 0
    kv_transfer_failures: int = 0
    kv_transfer_bytes: int = 0
    kv_transfer_seconds: float = 0.0
    # Cumulative step counters since the worker started (a planner diffs them per interval).
    steps_total: int = 0  # engine steps that computed something
    step_seconds_total: float = 0.0  # wall time of those steps
    prefill_tokens_total: int = 0  # prompt tokens computed (cache hits and pulled KV excluded)
    decode_seqs_total: int = 0  # sequences decoded, summed over steps (/ steps: mean decode batch)
    context_tokens_total: int = 0  # context length of those sequences, summed (/ decode_seqs: mean)
    preemptions_total: int = 0  # running requests preempted (blocks freed, recomputed later) since the worker started
    grammar_seconds_total: float = 0.0  # host time in the grammar library (structured output's masks)


KV_TRANSFER_FAILED = "KV transfer failed"
"""How a decode worker's error for a failed KV pull begins (the router moves such a request)."""


class StepOutputs(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """What a worker sends back after a step: the deltas plus a load snapshot."""

    deltas: list[TokenDelta]
    stats: EngineStats | None = None


class Shutdown(msgspec.Struct, frozen=True, tag=True):
    """Asks a worker to stop after its current step."""


class SetRole(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Switch an idle worker's role (planner flips); it keeps its weights, KV cache and prefix cache.
    The answer is a `WorkerReady` with the new role, or `RoleRefused` while it still has work."""

    role: Role
    token_budget: int | None = None  # the new role's scheduler limits (None: keep the current ones)
    max_num_seqs: int | None = None


class SetDraining(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Take the worker out of routing (or put it back) for every router that talks to it: the worker
    tells all its clients `WorkerDraining`, so a flip or a removal started by one frontend process
    (or the planner's own router) is seen by every router replica."""

    draining: bool


class WorkerDraining(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """A worker's word to every client after a `SetDraining`: route nothing new to it (or again)."""

    worker_id: str
    draining: bool


class ForgetClient(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """A frontend process died: abort every request its client sockets (ids starting with
    `client_prefix`) sent, so nothing runs on for a reader that is gone."""

    client_prefix: str


class RoleRefused(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """A worker's answer to a `SetRole` it could not follow; its role is unchanged."""

    worker_id: str
    role: Role  # the role it keeps
    reason: str


class WorkerLeaving(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """A worker got SIGTERM: route nothing new to it. It finishes what it has for up to `grace_s`
    seconds, then sends `WorkerGone` and exits."""

    worker_id: str
    grace_s: float


class WorkerGone(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """A worker's last message before it exits: requests it still had will get no more deltas."""

    worker_id: str
    reason: str


class WorkerReady(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """A worker's answer to `Connect`: its engine is loaded and these are its limits."""

    worker_id: str = ""
    role: Role = "both"
    model_name: str
    max_model_len: int
    vocab_size: int
    kv_blocks_total: int
    block_size: int
    draining: bool = False  # taken out of routing by a `SetDraining` (a client connecting late learns it here)


class BlockStored(msgspec.Struct, frozen=True, tag=True, array_like=True):
    """Full blocks entered in a worker's prefix cache: a chain, each hash the next one's parent;
    `parent_hash` is the first one's parent (hashing.ROOT_PARENT_HASH at a prompt's start)."""

    block_hashes: list[int]
    parent_hash: int


class BlockRemoved(msgspec.Struct, frozen=True, tag=True, array_like=True):
    """Blocks evicted from a worker's prefix cache."""

    block_hashes: list[int]


class AllBlocksCleared(msgspec.Struct, frozen=True, tag=True, array_like=True):
    """The worker dropped its whole prefix cache."""


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


class KVEventBatch(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Event plane, topic `kv`: a worker's cache changes in order. `event_id` counts batches from 1
    per worker process (`instance_id`), so a gap or a new instance tells a router to resync."""

    worker_id: str
    instance_id: str
    event_id: int
    events: list[KVEvent]


class KVDump(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """A worker's whole prefix cache as (block_hash, parent_hash) pairs, as of batch `event_id`."""

    worker_id: str
    instance_id: str
    event_id: int
    blocks: list[tuple[int, int]]


class LoadReport(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Event plane, topic `load`: a worker's load, published every few hundred ms."""

    worker_id: str
    role: Role
    stats: EngineStats
    time: float  # the worker's wall clock (time.time())


class WorkerInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A worker as discovery lists it: where to send requests and where its events come from."""

    worker_id: str
    role: Role
    request_addr: str
    event_addr: str
    pid: int = 0
    host: str = ""
    device: str = "cpu"
    model_name: str = ""  # what it serves ("": not said; the launcher's workers leave it out)
    kv_addr: str = ""  # its KV transfer endpoint, for operators (peers get it with each transfer)


class DiscoverySubscribe(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """A frontend process asks the launcher's discovery relay for the workers and their changes."""

    frontend_id: str


class DiscoverySnapshot(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """The relay's answer to `DiscoverySubscribe`: every registered worker now."""

    workers: list[WorkerInfo]


class DiscoveryChange(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """One discovery event, relayed to every subscribed frontend process in order."""

    kind: str  # "added" | "removed" | "updated"
    worker: WorkerInfo
    reason: str = ""


class SessionPinned(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Replica bus, topic `session`: a router replica sent a session's request to `worker_id`; the
    other replicas keep the session there too."""

    session_id: str
    worker_id: str


class FinishedRecord(msgspec.Struct, frozen=True, array_like=True):
    """One finished request as a router replica saw it (`tidal.fleet_snapshot.FinishedRequest`)."""

    finished_at: float  # time.monotonic(): one clock for every process of a machine
    ttft_s: float
    itl_s: float | None
    prompt_tokens: int
    cached_tokens: int
    output_tokens: int


class RequestLogBatch(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Replica bus, topic `log`: what one router replica saw since its last batch (arrivals and
    finished requests), for the planner's router in the launcher process."""

    frontend_id: str
    arrivals: int
    queue_depth: int
    finished: list[FinishedRecord]


RequestPlaneMessage = (Connect | AddRequest | AbortRequest | ReleaseKV | KVDumpRequest | SetRole | SetDraining
                       | ForgetClient | Shutdown)
WorkerMessage = WorkerReady | RoleRefused | StepOutputs | KVDump | WorkerLeaving | WorkerGone | WorkerDraining
RelayMessage = DiscoverySubscribe | DiscoverySnapshot | DiscoveryChange
ReplicaBusMessage = SessionPinned | RequestLogBatch
EventMessage = LoadReport | KVEventBatch


# ---- the control plane (NATS, cluster mode): planner <-> frontends ---------------------------------

class ObservationMessage(msgspec.Struct, frozen=True, kw_only=True):
    """A frontend's planner observation (`tidal.planner.types.Observation`, msgpack-encoded: the
    planner decodes it; this module stays below the planner)."""

    frontend_id: str
    observation: msgspec.Raw


class FlipCommand(msgspec.Struct, frozen=True, kw_only=True):
    """The planner asks a frontend to drain a worker and give it another role."""

    worker_id: str
    role: Role  # the new role
    token_budget: int | None = None  # the new role's scheduler limits (None: the worker keeps its own)
    max_num_seqs: int | None = None


class FlipReply(msgspec.Struct, frozen=True, kw_only=True):
    ok: bool
    error: str = ""
    drain_s: float = 0.0
    unavailable_s: float = 0.0
    total_s: float = 0.0
