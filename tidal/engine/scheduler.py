"""The scheduler: a pure CPU policy that decides which requests run how many tokens each step.

Owns the waiting queue and the running list; the KV cache manager owns their blocks.
Each step: running requests first (one decode token each, or their next prefill chunk), then
waiting requests in arrival order while the token budget, the sequence cap and the blocks last.
When a running request cannot get a block, the most recently started running request is
preempted (its blocks freed; it waits at the head of the queue and recomputes later).
`update` applies the sampled tokens and finishes requests; nothing touches tensors here.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

from tidal.config import SchedulerConfig
from tidal.engine.kv_cache.manager import KVCacheManager
from tidal.engine.request import Request, RequestStatus


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    block_ids: list[int]

    @property
    def samples(self) -> bool:
        """This step catches the request up, so its last token's logits pick the next token."""
        return self.request.num_computed_tokens + self.num_new_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    num_preempted: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, max_model_len: int,
                 eos_token_ids: Iterable[int] = ()):
        self.config = config
        self.kv = kv
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.prefix_hit_tokens_total = 0
        self.preemptions_total = 0

    # ---- queue changes --------------------------------------------------------------------
    def add(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request_id {request.request_id!r}")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def abort(self, request_id: str) -> Request | None:
        request = self.requests.get(request_id)
        if request is None:
            return None
        self._finish(request, RequestStatus.FINISHED_ABORTED)
        return request

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def add_pulled(self, request: Request) -> None:
        """A request whose prompt KV arrived from a prefill worker joins the running list."""
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    def add_waiting_for_kv(self, request: Request) -> None:
        """A request whose KV is being pulled: known (for aborts and stats) but not scheduled."""
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request_id {request.request_id!r}")
        request.status = RequestStatus.WAITING_FOR_KV
        self.requests[request.request_id] = request

    @property
    def num_pending_prefill_tokens(self) -> int:
        """Prompt tokens not computed yet, over queued and running requests."""
        return sum(r.num_tokens - r.num_computed_tokens for r in self.waiting) + sum(
            r.num_tokens - r.num_computed_tokens - 1 for r in self.running
            if r.num_computed_tokens < r.num_tokens - 1)

    # ---- one step ----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.token_budget
        scheduled_ids: set[str] = set()
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            while not self.kv.allocate_slots(request, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                out.num_preempted += 1
                if victim is request:
                    break
            else:
                out.scheduled.append(ScheduledRequest(request, num_new, self.kv.block_ids(request.request_id)))
                scheduled_ids.add(request.request_id)
                budget -= num_new
                i += 1
        if out.num_preempted == 0:
            budget = self._schedule_waiting(out, budget)
        return out

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            hits = self.kv.find_cached_prefix(request)
            num_hit_tokens = len(hits) * self.kv.block_size
            num_new = request.num_tokens - num_hit_tokens
            if not self.config.enable_chunked_prefill:
                if num_new > budget and out.scheduled:
                    break  # whole prompts only: wait for a step with room
            else:
                num_new = min(num_new, budget)
            if not self.kv.allocate_slots(request, num_new, hits):
                break
            self.waiting.popleft()
            request.num_computed_tokens = num_hit_tokens
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_hit_tokens
                self.prefix_hit_tokens_total += num_hit_tokens
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.scheduled.append(ScheduledRequest(request, num_new, self.kv.block_ids(request.request_id)))
            budget -= num_new
        return budget

    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.preemptions_total += 1
        self.waiting.appendleft(request)

    # ---- after the model ran -----------------------------------------------------------------
    def update(self, out: SchedulerOutput, sampled: dict[str, int], complete: Collection[str] = ()) -> list[Request]:
        """Advance counters, append sampled tokens; return the requests that finished now.
        `complete`: requests whose structured output is complete with this token (they stop)."""
        finished = []
        for item in out.scheduled:
            request = item.request
            if request.status is not RequestStatus.RUNNING:
                continue  # aborted while the step ran
            request.num_computed_tokens += item.num_new_tokens
            token_id = sampled.get(request.request_id)
            if token_id is None:
                continue  # a prefill chunk that does not reach the end yet
            request.append_output_token(token_id)
            status = RequestStatus.FINISHED_STOPPED if request.request_id in complete \
                else self._stop_status(request, token_id)
            if status is not None:
                self._finish(request, status)
                finished.append(request)
        return finished

    def _stop_status(self, request: Request, token_id: int) -> RequestStatus | None:
        params = request.sampling_params
        if request.num_output_tokens >= params.min_tokens:
            if token_id in params.stop_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if not params.ignore_eos and token_id in self.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
        if request.num_tokens >= request.max_num_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _finish(self, request: Request, status: RequestStatus) -> None:
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED):
            self.waiting.remove(request)
        request.status = status
        if request.hold_kv and status is RequestStatus.FINISHED_LENGTH:
            self.kv.hold(request)
        else:
            self.kv.free(request)
        del self.requests[request.request_id]
