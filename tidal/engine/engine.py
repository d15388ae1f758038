"""The engine loop: requests in, one scheduled model step at a time, token deltas out.

`EngineCore` owns the scheduler, the KV cache manager, the model runner and (in a worker)
the KV transfer backend. It is synchronous and single-threaded; the worker process (or the
offline `LLM`) drives `step()` in a loop and feeds it `AddRequest`/`abort` between steps.
Every request ends with exactly one finished delta (stop, length, abort or error), after which
the engine holds nothing for it, with one exception: a remote prefill (`hold_kv`) leaves its
blocks held until the decode worker's `ReleaseKV` (or an abort, or the hold's timeout).

With `parallel.tensor_parallel_size > 1` the engine is rank 0 of a tensor-parallel group: it
starts the other ranks' processes (`tensor_parallel.TensorParallelGroup`) before loading its own
shard, and `close()` stops them. Whoever builds an `EngineCore` closes it.

Disaggregation, decode side: an `AddRequest` with `kv_transfer_params` becomes a request in
WAITING_FOR_KV; each step the engine gives such requests blocks (locally cached prefix blocks
are reused, only the rest is pulled), starts their pulls, and polls them. A finished pull joins
the running list; a failed one ends the request with an error. Either way the prefill worker
is told to release its blocks (`releases`, which the worker sends). An abort during a pull is
deferred until the pull ends, so no block is freed while a copy may still write to it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from dataclasses import dataclass

import torch

from tidal.config import EngineConfig
from tidal.engine.kv_cache.manager import KVCacheManager
from tidal.engine.model_runner import ModelRunner, kv_layout
from tidal.engine.request import Request, RequestStatus
from tidal.engine.scheduler import Scheduler
from tidal.engine.tensor_parallel import TensorParallelGroup
from tidal.models.loader import load_model
from tidal.protocol import (KV_TRANSFER_FAILED, AddRequest, AllBlocksCleared, BlockRemoved, BlockStored,
                            EngineStats, KVEvent, KVTransferParams, TokenDelta)
from tidal.tokenizer import load_tokenizer
from tidal.transfer import KVTransferConfig, KVTransferError, Transfer, create_kv_transfer

logger = logging.getLogger(__name__)


@dataclass
class _Pull:
    """A decode-side request waiting for its prompt's KV."""

    request: Request
    params: KVTransferParams
    transfer: Transfer | None = None  # None until blocks are allocated and the pull started
    abort_pending: bool = False


@dataclass
class StepCounters:
    """Cumulative step statistics for load reports (a planner diffs them per interval)."""

    steps_total: int = 0
    step_seconds_total: float = 0.0
    prefill_tokens_total: int = 0
    decode_seqs_total: int = 0
    context_tokens_total: int = 0

    def count(self, out) -> None:
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
    tp_group: TensorParallelGroup | None = None  # tensor parallel: the other ranks (this is rank 0)

    def __init__(self, config: EngineConfig, worker_id: str = "engine",
                 transfer_config: KVTransferConfig | None = None, record_kv_events: bool = False):
        started = time.monotonic()
        tp_size = config.parallel.tensor_parallel_size
        device = torch.device(config.model.device)
        if device.type == "cuda" and device.index is not None and tp_size == 1:
            # Triton launches on the current device: a worker on cuda:1 whose current device stayed
            # cuda:0 fails its first kernel ("cannot be accessed from Triton").
            torch.cuda.set_device(device)
        if tp_size > 1:
            self.tp_group = TensorParallelGroup(config, with_kv_transfer=transfer_config is not None)
        try:
            loaded = load_model(config.model, tp_size=tp_size)
            tokenizer = self._load_tokenizer(config)
            layout = kv_layout(config, loaded)
            transfer = None
            if transfer_config is not None:
                transfer = create_kv_transfer(layout, torch.device(loaded.device), worker_id, transfer_config)
            if self.tp_group is not None:
                self.tp_group.connect()
            runner = ModelRunner(config, loaded, layout, transfer.cache if transfer else None,
                                 on_step=self.tp_group.broadcast if self.tp_group is not None else None)
        except BaseException:
            if self.tp_group is not None:
                self.tp_group.close()
            raise
        tokenizer_eos = tokenizer.eos_token_ids if tokenizer is not None else ()
        max_model_len = min(loaded.max_model_len, config.model.max_model_len or loaded.max_model_len,
                            runner.num_blocks * layout.block_size)
        self._setup(config, worker_id, runner, model_name=config.model.served_model_name or loaded.name,
                    vocab_size=loaded.arch.vocab_size, max_model_len=max_model_len,
                    eos_token_ids=frozenset(tokenizer_eos) | frozenset(loaded.arch.eos_token_ids or ()),
                    record_kv_events=record_kv_events, transfer=transfer,
                    transfer_timeout_s=transfer_config.timeout_s if transfer_config else 30.0)
        self.tokenizer = tokenizer
        if (config.model.model or "").startswith("dummy:") and tokenizer is not None \
                and tokenizer.vocab_size < loaded.arch.vocab_size:
            # Random weights pick every id alike, and ids past the tokenizer decode to no text, so a
            # client would see tokens arrive in clumps: a dummy model samples inside its tokenizer.
            runner.sample_vocab_size = tokenizer.vocab_size
        logger.info("engine ready: model=%s dtype=%s device=%s kv_blocks=%d block_size=%d "
                    "max_model_len=%d token_budget=%d (%.1fs)", self.model_name, loaded.dtype,
                    loaded.device, runner.num_blocks, layout.block_size, self.max_model_len,
                    config.scheduler.token_budget, time.monotonic() - started)

    @classmethod
    def with_runner(cls, config: EngineConfig, runner, *, model_name: str, vocab_size: int, max_model_len: int,
                    worker_id: str = "engine", eos_token_ids: frozenset[int] = frozenset(),
                    record_kv_events: bool = False) -> EngineCore:
        """An engine around a runner that is not a model (the simulator's timed stand-in): the same
        scheduler, KV cache manager and request handling, no weights, no tokenizer."""
        engine = cls.__new__(cls)
        engine._setup(config, worker_id, runner, model_name=model_name, vocab_size=vocab_size,
                      max_model_len=max_model_len, eos_token_ids=eos_token_ids, record_kv_events=record_kv_events)
        engine.tokenizer = None
        return engine

    def _setup(self, config: EngineConfig, worker_id: str, runner, *, model_name: str, vocab_size: int,
               max_model_len: int, eos_token_ids: frozenset[int], record_kv_events: bool, transfer=None,
               transfer_timeout_s: float = 30.0) -> None:
        self.config = config
        self.worker_id = worker_id
        self.model_name = model_name
        self.eos_token_ids = eos_token_ids
        self.transfer = transfer
        self.transfer_timeout_s = transfer_timeout_s
        self.runner = runner
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.kv = KVCacheManager(runner.num_blocks, config.cache.block_size, config.cache.enable_prefix_caching,
                                 record_events=record_kv_events)
        self.scheduler = Scheduler(config.scheduler, self.kv, self.max_model_len, self.eos_token_ids)
        self._pending: list[TokenDelta] = []  # deltas decided outside a step (errors, aborts)
        self.pulls: dict[str, _Pull] = {}  # decode side, in arrival order
        self.held_until: dict[str, float] = {}  # prefill side: request_id -> hold deadline
        self.releases: deque[tuple[str, str]] = deque()  # (prefill worker endpoint, request_id) to send
        self.release_addr = ""  # this worker's request endpoint, set by the worker process
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.transfers_total = 0
        self.transfer_failures_total = 0
        self.transfer_bytes_total = 0
        self.transfer_seconds_total = 0.0
        self.step_counters = StepCounters()

    @staticmethod
    def _load_tokenizer(config: EngineConfig):
        """The engine needs the tokenizer only for its stop ids. Dummy models borrow the embedded
        one; where that package is absent (a bare GPU box), they run on token ids alone."""
        try:
            return load_tokenizer(config.model.model, config.model.tokenizer)
        except ValueError:
            if not (config.model.model or "").startswith("dummy:") or config.model.tokenizer:
                raise
            logger.warning("no tokenizer for %s: token ids only", config.model.model)
            return None

    def add_request(self, add: AddRequest) -> None:
        error = self._validate(add)
        if error is not None:
            self._pending.append(TokenDelta(request_id=add.request_id, new_token_ids=[], finished=True,
                                            finish_reason="error", error=error))
            if add.kv_transfer_params is not None:
                self.releases.append((add.kv_transfer_params.release_addr, add.request_id))
            return
        request = Request(add.request_id, add.prompt_token_ids, add.sampling_params,
                          self.max_model_len, add.arrival_time, hold_kv=add.hold_kv)
        request.added_time = time.monotonic()
        self.prompt_tokens_total += request.num_prompt_tokens
        self._skip_draws(request, add.num_resumed_tokens)  # a migrated request's earlier output
        if add.kv_transfer_params is None:
            self.scheduler.add(request)
            return
        for token_id in add.output_token_ids:
            request.append_output_token(token_id)
        self._skip_draws(request, len(add.output_token_ids))
        self.scheduler.add_waiting_for_kv(request)
        self.pulls[add.request_id] = _Pull(request, add.kv_transfer_params)

    def _skip_draws(self, request: Request, n: int) -> None:
        """Advance a seeded request's generator past `n` tokens sampled elsewhere (one draw each),
        so its stream continues where it would be."""
        if request.generator is not None:
            for _ in range(n):
                torch.empty(self.vocab_size).exponential_(generator=request.generator)

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
        if add.hold_kv and self.transfer is None:
            return "this worker has no KV transfer backend, so it cannot serve remote prefills"
        params = add.kv_transfer_params
        if params is not None:
            if self.transfer is None:
                return "this worker has no KV transfer backend, so it cannot pull KV"
            if not add.output_token_ids:
                return "a request with pulled KV must carry the prefill worker's first token"
            if params.num_tokens != n or len(params.block_ids) < -(-n // self.kv.block_size):
                return "kv_transfer_params do not cover the prompt"
        return None

    def abort_request(self, request_id: str) -> None:
        if self.kv.release(request_id):  # a held remote prefill whose decode will never come
            self.held_until.pop(request_id, None)
            return
        pull = self.pulls.get(request_id)
        if pull is not None and pull.transfer is not None:
            pull.abort_pending = True  # a copy may still write into its blocks: end it after
            return
        if pull is not None:
            del self.pulls[request_id]
            self.releases.append((pull.params.release_addr, request_id))
        request = self.scheduler.abort(request_id)
        if request is not None:
            self._pending.append(self._delta(request, []))

    def release_kv(self, request_id: str) -> None:
        """The decode worker is done pulling this request's KV (or gave up): free it."""
        if self.kv.release(request_id):
            self.held_until.pop(request_id, None)

    def has_work(self) -> bool:
        """There is something to compute now (a step, or deltas to send)."""
        return self.scheduler.has_unfinished() and (bool(self.scheduler.waiting) or bool(self.scheduler.running)) \
            or bool(self._pending) or any(p.transfer is None for p in self.pulls.values())

    def has_pulls(self) -> bool:
        """KV pulls are in flight: poll soon, but there may be nothing to compute."""
        return bool(self.pulls)

    def step(self) -> list[TokenDelta]:
        self._expire_holds()
        if self.pulls:
            self._advance_pulls()
        deltas, self._pending = self._pending, []
        if not (self.scheduler.waiting or self.scheduler.running):
            return deltas
        out = self.scheduler.schedule()
        if not out.scheduled:
            return deltas
        now = time.monotonic()
        self.step_counters.count(out)
        sampled, logprobs = self.runner.execute(out, self.eos_token_ids)
        self.scheduler.update(out, sampled)
        self.step_counters.step_seconds_total += time.monotonic() - now
        for item in out.scheduled:
            request = item.request
            if request.first_scheduled_time is None:
                request.first_scheduled_time = now
            token_id = sampled.get(request.request_id)
            if token_id is None or request.status is RequestStatus.FINISHED_ABORTED:
                continue
            self.generation_tokens_total += 1
            lp = logprobs.get(request.request_id)
            deltas.append(self._delta(request, [token_id], [lp] if lp is not None else None))
        return deltas

    # ---- disaggregation ------------------------------------------------------------------
    def _advance_pulls(self) -> None:
        """Start pulls that can get blocks (in arrival order), finish those that are done."""
        for request_id, pull in list(self.pulls.items()):
            if pull.transfer is None:
                if not self._start_pull(pull):
                    break  # no room yet; later arrivals wait behind it
            elif pull.transfer.done():
                del self.pulls[request_id]
                self._finish_pull(pull)

    def _start_pull(self, pull: _Pull) -> bool:
        request, bs = pull.request, self.kv.block_size
        n = request.num_prompt_tokens
        hits = self.kv.find_cached_prefix(request)
        if not self.kv.allocate_slots(request, n - len(hits) * bs, hits, defer_caching=True):
            return False
        request.num_cached_tokens = len(hits) * bs
        self.scheduler.prefix_hit_tokens_total += len(hits) * bs
        table = self.kv.block_ids(request.request_id)
        num_blocks = -(-n // bs)
        src, dst = pull.params.block_ids[len(hits):num_blocks], table[len(hits):num_blocks]
        if not src:  # every full block was cached here already
            pull.transfer = _ImmediateTransfer()
            return True
        try:
            pull.transfer = self.transfer.start_pull(pull.params.source, src, dst)
        except KVTransferError as exc:
            pull.transfer = _ImmediateTransfer(str(exc))
        return True

    def _finish_pull(self, pull: _Pull) -> None:
        request, transfer = pull.request, pull.transfer
        self.releases.append((pull.params.release_addr, request.request_id))
        self.transfers_total += 1
        try:
            transfer.result()
        except KVTransferError as exc:
            self.transfer_failures_total += 1
            logger.warning("KV pull for %s failed: %s", request.request_id, exc)
            self.scheduler.abort(request.request_id)
            self._pending.append(TokenDelta(request_id=request.request_id, new_token_ids=[], finished=True,
                                            finish_reason="error", error=f"{KV_TRANSFER_FAILED}: {exc}"))
            return
        self.transfer_bytes_total += transfer.num_bytes
        self.transfer_seconds_total += transfer.seconds
        request.kv_transfer_s = transfer.seconds
        if pull.abort_pending:
            self.scheduler.abort(request.request_id)
            self._pending.append(self._delta(request, []))
            return
        request.num_computed_tokens = request.num_prompt_tokens
        self.kv.cache_blocks(request, request.num_prompt_tokens)
        self.scheduler.add_pulled(request)

    def hold_params(self, request: Request) -> KVTransferParams:
        return KVTransferParams(source=self.transfer.source_info(), block_ids=[b.block_id for b in
                                self.kv.held[request.request_id]], num_tokens=request.num_prompt_tokens,
                                release_addr=self.release_addr)

    def _expire_holds(self) -> None:
        if not self.held_until:
            return
        now = time.monotonic()
        for request_id, deadline in list(self.held_until.items()):
            if now > deadline:
                logger.warning("no decode worker pulled %s in time; freeing its KV", request_id)
                self.release_kv(request_id)

    def _delta(self, request: Request, token_ids: list[int], logprobs=None) -> TokenDelta:
        status = request.status
        params = None
        if status.finished and request.request_id in self.kv.held:
            params = self.hold_params(request)
            self.held_until[request.request_id] = time.monotonic() + 2 * self.transfer_timeout_s
        first = not request.reported
        request.reported = True
        queue_s = None
        if first and request.first_scheduled_time is not None:
            queue_s = request.first_scheduled_time - request.added_time
        return TokenDelta(request_id=request.request_id, new_token_ids=token_ids,
                          finished=status.finished, finish_reason=status.value if status.finished else None,
                          logprobs=logprobs, num_prompt_tokens=request.num_prompt_tokens,
                          num_cached_tokens=max(request.num_cached_tokens, 0), kv_transfer_params=params,
                          queue_s=queue_s, kv_transfer_s=request.kv_transfer_s if first else None)

    def stats(self) -> EngineStats:
        return EngineStats(num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
                           kv_blocks_used=self.kv.num_used_blocks, kv_blocks_total=self.kv.num_blocks,
                           prefix_cache_hit_tokens=self.scheduler.prefix_hit_tokens_total,
                           prompt_tokens=self.prompt_tokens_total,
                           generation_tokens=self.generation_tokens_total,
                           num_pending_prefill_tokens=self.scheduler.num_pending_prefill_tokens,
                           num_waiting_for_kv=len(self.pulls), num_held_kv=len(self.kv.held),
                           kv_transfers=self.transfers_total, kv_transfer_failures=self.transfer_failures_total,
                           kv_transfer_bytes=self.transfer_bytes_total,
                           kv_transfer_seconds=self.transfer_seconds_total,
                           **self.step_counters.as_fields())

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
                "KV pulls in flight": len(self.pulls), "finished prefills holding KV": len(self.kv.held)}
        what = [f"{n} {name}" for name, n in busy.items() if n]
        return ", ".join(what) if what else None

    def take_kv_events(self) -> list[KVEvent]:
        """Prefix-cache changes since the last call, in order, runs merged (for the router)."""
        events: list[KVEvent] = []
        for kind, block_hash, parent_hash in self.kv.pool.take_events():
            last = events[-1] if events else None
            if kind == "stored":
                if isinstance(last, BlockStored) and last.block_hashes[-1] == parent_hash:
                    last.block_hashes.append(block_hash)
                else:
                    events.append(BlockStored([block_hash], parent_hash))
            elif kind == "removed":
                if isinstance(last, BlockRemoved):
                    last.block_hashes.append(block_hash)
                else:
                    events.append(BlockRemoved([block_hash]))
            else:
                events.append(AllBlocksCleared())
        return events

    def close(self) -> None:
        if self.transfer is not None:
            self.transfer.close()
        if self.tp_group is not None:
            self.tp_group.close()


class _ImmediateTransfer(Transfer):
    """A pull with nothing to copy (error None), or one that could not start (bad source)."""

    def __init__(self, error: str | None = None) -> None:
        super().__init__(0)
        self.error = error
        self.finished = self.started

    def done(self) -> bool:
        return True

    def result(self) -> None:
        if self.error is not None:
            raise KVTransferError(self.error)
