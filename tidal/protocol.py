"""Every message that crosses a process boundary, as msgspec Structs.

These types are the request plane's vocabulary: the frontend sends `AddRequest` and
`AbortRequest` to a worker; the worker answers with batches of `TokenDelta`. They are plain
values (no tensors, no callables) so that msgspec can encode them without pickle.
"""

from __future__ import annotations

import msgspec


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

    @property
    def greedy(self) -> bool:
        return self.temperature <= 1e-5 or self.top_k == 1


class AddRequest(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float = 0.0


class AbortRequest(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    request_id: str


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


class EngineStats(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    prefix_cache_hit_tokens: int
    prompt_tokens: int
    generation_tokens: int


class StepOutputs(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """What a worker sends back after a step: the deltas plus a load snapshot."""

    deltas: list[TokenDelta]
    stats: EngineStats | None = None


class Shutdown(msgspec.Struct, frozen=True, tag=True):
    """Asks a worker to stop after its current step."""


class WorkerReady(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """A worker's first message: its engine is loaded and these are its limits."""

    model_name: str
    max_model_len: int
    vocab_size: int
    kv_blocks_total: int
    block_size: int


RequestPlaneMessage = AddRequest | AbortRequest | Shutdown
WorkerMessage = WorkerReady | StepOutputs
