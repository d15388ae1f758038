"""The engine loop: requests in, one scheduled model step at a time, token deltas out.

`EngineCore` owns the scheduler, the KV cache manager and the KV connector, around a model
runner it is given (`tidal.engine.factory.build_engine` builds the real one; the simulator and
benchmarks pass stand-ins). It is synchronous and single-threaded; the worker process (or the
offline `LLM`) drives `step()` in a loop and feeds it `AddRequest`/`abort` between steps.
Every request ends with exactly one finished delta (stop, length, abort or error), after which
the engine holds nothing for it, with one exception: a remote prefill (`hold_kv`) leaves its
blocks held until the decode worker's `ReleaseKV` (or an abort, or the hold's timeout).

A step: move the KV connector's pulls along (disaggregation, see `kv_connector.py`), schedule,
run the model, apply the sampled tokens and emit a delta per request that got one.

With a tensor-parallel group (`tp_group`, rank 0's handle on the other ranks' processes) the
runner broadcasts each step to the other ranks, and `close()` stops them. Whoever builds an
`EngineCore` closes it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import torch

from tidal.config import EngineConfig
from tidal.engine.kv_cache.manager import KVCacheManager
from tidal.engine.kv_connector import KVConnector, PulledKV
from tidal.engine.logits_processors import check_params
from tidal.engine.request import Request, RequestStatus
from tidal.engine.scheduler import Scheduler, SchedulerOutput
from tidal.engine.structured_output import StructuredOutputs
from tidal.engine.tensor_parallel import TensorParallelGroup
from tidal.protocol import KV_TRANSFER_FAILED, AddRequest, EngineStats, KVEvent, TokenDelta, TokenLogprob
from tidal.transfer import KVTransferBackend

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedModel:
    """What the engine knows of the model its runner runs."""

    name: str
    """The model name clients see."""
    vocab_size: int
    """Prompt token ids must lie below it."""
    max_model_len: int
    """Most tokens (prompt + output) one request may hold."""
    eos_token_ids: frozenset[int] = frozenset()
    """Tokens that end a request (unless it asks `ignore_eos`): the tokenizer's and the model's."""


@dataclass
class StepCounters:
    """Cumulative step statistics for load reports (a planner diffs them per interval)."""

    steps_total: int = 0
    step_seconds_total: float = 0.0
    prefill_tokens_total: int = 0
    decode_seqs_total: int = 0
    context_tokens_total: int = 0

    def count(self, out: SchedulerOutput) -> None:
        """One scheduled step, before its tokens are applied: a sequence whose prompt is all
        computed decodes (context = the tokens already computed); the others prefill."""
        self.steps_total += 1
        for item in out.scheduled:
            request = item.request
            if request.num_computed_tokens >= request.num_prompt_tokens:
                self.decode_seqs_total += 1
                self.context_tokens_total += request.num_computed_tokens
            else:
                self.prefill_tokens_total += item.num_new_tokens

    def as_fields(self) -> dict:
        return dataclasses.asdict(self)


class EngineCore:
    def __init__(self, config: EngineConfig, runner, model: ServedModel, *,
                 transfer: KVTransferBackend | None = None, tp_group: TensorParallelGroup | None = None,
                 worker_id: str = "engine", record_kv_events: bool = False,
                 structured: StructuredOutputs | None = None):
        """`runner`: a `ModelRunner` or a stand-in with `num_blocks` and `execute(out, eos_token_ids)`;
        `transfer`: the KV transfer backend (disaggregation), None for an aggregated engine;
        `tp_group`: rank 0's handle on its tensor-parallel group (closed by `close()`);
        `structured`: the grammar matchers, shared with the runner that masks the logits (None: an
        engine without a tokenizer refuses structured output)."""
        self.config = config
        self.runner = runner
        self.worker_id = worker_id
        self.model_name = model.name
        self.vocab_size = model.vocab_size
        self.max_model_len = model.max_model_len
        self.eos_token_ids = model.eos_token_ids
        self.tp_group = tp_group
        self.structured = structured
        self.kv = KVCacheManager(runner.num_blocks, config.cache.block_size, config.cache.enable_prefix_caching,
                                 record_events=record_kv_events)
        self.scheduler = Scheduler(config.scheduler, self.kv, self.max_model_len, self.eos_token_ids)
        self.connector = KVConnector(self.kv, transfer)
        self._pending: list[TokenDelta] = []  # deltas decided outside a step (errors, aborts, ended pulls)
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.step_counters = StepCounters()

    # ---- requests in ----------------------------------------------------------------------
    def add_request(self, add: AddRequest) -> None:
        error = self._validate(add) or self._start_grammar(add)
        if error is not None:
            self._pending.append(_error_delta(add.request_id, error))
            if add.kv_transfer_params is not None:
                self.connector.refuse_pull(add.request_id, add.kv_transfer_params)
            return
        request = Request(add.request_id, add.prompt_token_ids, add.sampling_params,
                          self.max_model_len, add.arrival_time, hold_kv=add.hold_kv)
        request.added_time = time.monotonic()
        self.prompt_tokens_total += request.num_prompt_tokens
        request.num_resumed_tokens = add.num_resumed_tokens  # its penalties count them as output
        self._skip_draws(request, add.num_resumed_tokens)  # a migrated request's earlier output
        if add.kv_transfer_params is None:
            self.scheduler.add(request)
            return
        for token_id in add.output_token_ids:
            request.append_output_token(token_id)
        self._skip_draws(request, len(add.output_token_ids))
        self.scheduler.add_waiting_for_kv(request)
        self.connector.add_pull(request, add.kv_transfer_params)

    def _skip_draws(self, request: Request, n: int) -> None:
        """Advance a seeded request's generator past `n` tokens sampled elsewhere (one draw each),
        so its stream continues where it would be."""
        if request.generator is not None:
            for _ in range(n):
                torch.empty(self.vocab_size).exponential_(generator=request.generator)

    def _start_grammar(self, add: AddRequest) -> str | None:
        """A structured request's matcher, advanced over the output it already has (a migrated
        request's resumed tokens, then a remote prefill's first token); or why it cannot run."""
        structured = add.sampling_params.structured
        if structured is None:
            return None
        if self.structured is None:
            return "structured output needs the model's tokenizer, and this engine has none"
        resumed = add.prompt_token_ids[len(add.prompt_token_ids) - add.num_resumed_tokens:]
        return self.structured.add(add.request_id, structured, resumed + list(add.output_token_ids))

    def _validate(self, add: AddRequest) -> str | None:
        n = len(add.prompt_token_ids)
        if n == 0:
            return "the prompt is empty"
        if n >= self.max_model_len:
            return f"the prompt has {n} tokens; this model's context holds {self.max_model_len}"
        if min(add.prompt_token_ids) < 0 or max(add.prompt_token_ids) >= self.vocab_size:
            return f"prompt token ids must lie in [0, {self.vocab_size})"
        if add.sampling_params.max_tokens < 1:
            return "max_tokens must be at least 1"
        if not 0 <= add.num_resumed_tokens < n:
            return "num_resumed_tokens must lie in [0, the prompt's length)"
        if add.request_id in self.scheduler.requests or add.request_id in self.kv.held:
            return f"request_id {add.request_id!r} is already running"
        return check_params(add.sampling_params, self.vocab_size) or self.connector.check(add)

    def abort_request(self, request_id: str) -> None:
        if self.connector.abort(request_id):  # held KV freed, or a pull's abort deferred to its end
            return
        request = self.scheduler.abort(request_id)
        if request is not None:
            self._pending.append(self._delta(request, []))

    # ---- one step ---------------------------------------------------------------------------
    def has_work(self) -> bool:
        """There is something to compute now (a step, a pull to start, or deltas to send)."""
        return bool(self.scheduler.waiting or self.scheduler.running or self._pending) \
            or self.connector.has_unstarted_pulls()

    def has_pulls(self) -> bool:
        """KV pulls are in flight: poll soon, but there may be nothing to compute."""
        return self.connector.has_pulls()

    def step(self) -> list[TokenDelta]:
        """Move KV pulls and holds along, then schedule -> run the model -> emit token deltas."""
        deltas = self._step()
        if self.structured is not None:
            # Every request ends with one finished delta: its matcher goes with it (unless the delta
            # refused a second request under a running one's id).
            for delta in deltas:
                if delta.finished and delta.request_id not in self.scheduler.requests:
                    self.structured.free(delta.request_id)
        return deltas

    def _step(self) -> list[TokenDelta]:
        self._advance_connector()
        deltas, self._pending = self._pending, []
        out = self.scheduler.schedule() if self.scheduler.waiting or self.scheduler.running else None
        if out is None or not out.scheduled:
            return deltas
        sampled, logprobs = self._run(out)
        return deltas + self._emit(out, sampled, logprobs)

    def _advance_connector(self) -> None:
        self.connector.expire_holds()
        if self.connector.has_pulls():
            for pulled in self.connector.advance_pulls():
                self._end_pull(pulled)

    def _end_pull(self, pulled: PulledKV) -> None:
        """A pulled request runs from its next token on; a failed or aborted one ends now."""
        request = pulled.request
        if pulled.error is None and not pulled.aborted:
            self.scheduler.add_pulled(request)
            return
        self.scheduler.abort(request.request_id)
        if pulled.error is not None:
            self._pending.append(_error_delta(request.request_id, f"{KV_TRANSFER_FAILED}: {pulled.error}"))
        else:
            self._pending.append(self._delta(request, []))

    def _run(self, out: SchedulerOutput) -> tuple[dict[str, int], dict[str, TokenLogprob]]:
        """The model over one scheduled step; its sampled tokens applied to the requests."""
        started = time.monotonic()
        for item in out.scheduled:
            if item.request.first_scheduled_time is None:
                item.request.first_scheduled_time = started
        self.step_counters.count(out)
        sampled, logprobs = self.runner.execute(out, self.eos_token_ids)
        complete = self.structured.accept(sampled) if self.structured is not None else ()
        self.scheduler.update(out, sampled, complete)
        self.step_counters.step_seconds_total += time.monotonic() - started
        return sampled, logprobs

    def _emit(self, out: SchedulerOutput, sampled: dict[str, int],
              logprobs: dict[str, TokenLogprob]) -> list[TokenDelta]:
        """A delta for each request that sampled a token this step (an aborted one gets none here)."""
        deltas = []
        for item in out.scheduled:
            request = item.request
            token_id = sampled.get(request.request_id)
            if token_id is None or request.status is RequestStatus.FINISHED_ABORTED:
                continue
            self.generation_tokens_total += 1
            lp = logprobs.get(request.request_id)
            deltas.append(self._delta(request, [token_id], [lp] if lp is not None else None))
        return deltas

    def _delta(self, request: Request, token_ids: list[int], logprobs=None) -> TokenDelta:
        status = request.status
        first = not request.reported
        request.reported = True
        queue_s = None
        if first and request.first_scheduled_time is not None:
            queue_s = request.first_scheduled_time - request.added_time
        return TokenDelta(request_id=request.request_id, new_token_ids=token_ids,
                          finished=status.finished, finish_reason=status.value if status.finished else None,
                          logprobs=logprobs, num_prompt_tokens=request.num_prompt_tokens,
                          num_cached_tokens=max(request.num_cached_tokens, 0),
                          kv_transfer_params=self.connector.held_params(request) if status.finished else None,
                          queue_s=queue_s, kv_transfer_s=request.kv_transfer_s if first else None)

    # ---- what the worker reads and sets ------------------------------------------------------
    def stats(self) -> EngineStats:
        return EngineStats(num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
                           kv_blocks_used=self.kv.num_used_blocks, kv_blocks_total=self.kv.num_blocks,
                           prefix_cache_hit_tokens=self.scheduler.prefix_hit_tokens_total
                           + self.connector.prefix_hit_tokens_total,
                           prompt_tokens=self.prompt_tokens_total,
                           generation_tokens=self.generation_tokens_total,
                           num_pending_prefill_tokens=self.scheduler.num_pending_prefill_tokens,
                           preemptions_total=self.scheduler.preemptions_total,
                           **self.connector.stats_fields(), **self.step_counters.as_fields(),
                           grammar_seconds_total=self.structured.seconds_total if self.structured else 0.0)

    def set_scheduler_limits(self, token_budget: int | None, max_num_seqs: int | None) -> None:
        """A role flip's new limits (each role has its own: a prefill worker's budget is its device's
        prefill knee, a decode worker's batch cap keeps ITL in target); None keeps a limit."""
        changes = {k: v for k, v in (("token_budget", token_budget), ("max_num_seqs", max_num_seqs)) if v}
        if changes:
            self.scheduler.config = dataclasses.replace(self.scheduler.config, **changes)
            logger.info("scheduler limits now token_budget=%d max_num_seqs=%d", self.scheduler.config.token_budget,
                        self.scheduler.config.max_num_seqs)

    def idle_for_role_change(self) -> str | None:
        """None when the worker holds no request (running, waiting, pulling or held KV); else why not."""
        busy = {"running or waiting requests": len(self.scheduler.running) + len(self.scheduler.waiting),
                **self.connector.busy()}
        what = [f"{n} {name}" for name, n in busy.items() if n]
        return ", ".join(what) if what else None

    def take_kv_events(self) -> list[KVEvent]:
        """Prefix-cache changes since the last call, in order, runs merged (for the router)."""
        return self.kv.take_events()

    def cached_blocks(self) -> list[tuple[int, int]]:
        """(block_hash, parent_hash) of every block in the prefix cache (a router's resync)."""
        return self.kv.cached_blocks()

    def close(self) -> None:
        self.connector.close()
        if self.tp_group is not None:
            self.tp_group.close()


def _error_delta(request_id: str, error: str) -> TokenDelta:
    return TokenDelta(request_id=request_id, new_token_ids=[], finished=True, finish_reason="error", error=error)
