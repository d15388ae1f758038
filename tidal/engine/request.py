"""One request's state inside the engine: token counters, status, its sampling parameters.

There is no prefill/decode phase flag: a request is "prefilling" while `num_computed_tokens`
is behind `num_tokens`, and the scheduler simply catches it up. A prefix-cache hit, a chunk of
a long prompt and a recompute after preemption are all the same thing: catching up.
"""

from __future__ import annotations

import enum

import torch

from tidal.engine.logits_processors import LogitsAdjustment
from tidal.hashing import ROOT_PARENT_HASH, block_hashes
from tidal.protocol import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    WAITING_FOR_KV = "waiting_for_kv"  # a decode worker pulling its prompt's KV from a prefill worker
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED)


class Request:
    def __init__(self, request_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams,
                 max_model_len: int, arrival_time: float = 0.0, hold_kv: bool = False):
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.arrival_time = arrival_time
        self.hold_kv = hold_kv  # a remote prefill: keep the blocks for a decode worker when done
        self.added_time = 0.0  # engine clock (monotonic) when the engine took it
        self.first_scheduled_time: float | None = None
        self.kv_transfer_s: float | None = None
        self.reported = False  # its first delta has gone out
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_resumed_tokens = 0  # the prompt's last tokens that are its own output from elsewhere (migration)
        self.num_computed_tokens = 0
        self.num_cached_tokens = -1  # prefix-cache hit at first schedule; -1 until scheduled
        self.num_preemptions = 0
        self.status = RequestStatus.WAITING
        # Largest total length this request may reach (prompt + outputs).
        self.max_num_tokens = min(max_model_len, self.num_prompt_tokens + sampling_params.max_tokens)
        self.block_hashes: list[int] = []
        self.logits_adjustment = LogitsAdjustment.of(sampling_params)  # None: penalties and bias unused
        self.generator: torch.Generator | None = None
        if sampling_params.seed is not None:
            self.generator = torch.Generator().manual_seed(sampling_params.seed)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[self.num_prompt_tokens:]

    def append_output_token(self, token_id: int) -> None:
        self.all_token_ids.append(token_id)

    def update_block_hashes(self, block_size: int) -> list[int]:
        """Extend `block_hashes` to cover every full block of the known tokens."""
        done = len(self.block_hashes) * block_size
        if self.num_tokens - done >= block_size:
            parent = self.block_hashes[-1] if self.block_hashes else ROOT_PARENT_HASH
            self.block_hashes += block_hashes(self.all_token_ids[done:], block_size, parent)
        return self.block_hashes

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, status={self.status.value}, "
                f"computed={self.num_computed_tokens}/{self.num_tokens})")
