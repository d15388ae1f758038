"""The engine loop: requests in, one scheduled model step at a time, token deltas out.

`EngineCore` owns the scheduler, the KV cache manager and the model runner. It is synchronous
and single-threaded; the worker process (or the offline `LLM`) drives `step()` in a loop and
feeds it `AddRequest`/`abort` between steps. Every request ends with exactly one finished
delta (stop, length, abort or error), after which the engine holds nothing for it.
"""

from __future__ import annotations

import logging
import time

from tidal.config import EngineConfig
from tidal.engine.kv_cache.manager import KVCacheManager
from tidal.engine.model_runner import ModelRunner
from tidal.engine.request import Request, RequestStatus
from tidal.engine.scheduler import Scheduler
from tidal.models.loader import load_model
from tidal.protocol import AddRequest, EngineStats, TokenDelta
from tidal.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, config: EngineConfig):
        self.config = config
        started = time.monotonic()
        loaded = load_model(config.model)
        self.model_name = config.model.served_model_name or loaded.name
        self.tokenizer = self._load_tokenizer(config)
        tokenizer_eos = self.tokenizer.eos_token_ids if self.tokenizer is not None else ()
        self.eos_token_ids = frozenset(tokenizer_eos) | frozenset(loaded.arch.eos_token_ids or ())
        self.runner = ModelRunner(config, loaded)
        block_size = config.cache.block_size
        self.max_model_len = min(loaded.max_model_len, config.model.max_model_len or loaded.max_model_len,
                                 self.runner.num_blocks * block_size)
        self.vocab_size = loaded.arch.vocab_size
        self.kv = KVCacheManager(self.runner.num_blocks, block_size, config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.kv, self.max_model_len, self.eos_token_ids)
        self._pending: list[TokenDelta] = []  # deltas decided outside a step (errors, aborts)
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        logger.info("engine ready: model=%s dtype=%s device=%s kv_blocks=%d block_size=%d "
                    "max_model_len=%d token_budget=%d (%.1fs)", self.model_name, loaded.dtype,
                    loaded.device, self.runner.num_blocks, block_size, self.max_model_len,
                    config.scheduler.token_budget, time.monotonic() - started)

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
            return
        request = Request(add.request_id, add.prompt_token_ids, add.sampling_params,
                          self.max_model_len, add.arrival_time)
        self.scheduler.add(request)
        self.prompt_tokens_total += request.num_prompt_tokens

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
        if add.request_id in self.scheduler.requests:
            return f"request_id {add.request_id!r} is already running"
        return None

    def abort_request(self, request_id: str) -> None:
        request = self.scheduler.abort(request_id)
        if request is not None:
            self._pending.append(self._delta(request, []))

    def has_work(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._pending)

    def step(self) -> list[TokenDelta]:
        deltas, self._pending = self._pending, []
        if not self.scheduler.has_unfinished():
            return deltas
        out = self.scheduler.schedule()
        if not out.scheduled:
            return deltas
        sampled, logprobs = self.runner.execute(out, self.eos_token_ids)
        self.scheduler.update(out, sampled)
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
        return TokenDelta(request_id=request.request_id, new_token_ids=token_ids,
                          finished=status.finished, finish_reason=status.value if status.finished else None,
                          logprobs=logprobs, num_prompt_tokens=request.num_prompt_tokens,
                          num_cached_tokens=max(request.num_cached_tokens, 0))

    def stats(self) -> EngineStats:
        return EngineStats(num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
                           kv_blocks_used=self.kv.num_used_blocks, kv_blocks_total=self.kv.num_blocks,
                           prefix_cache_hit_tokens=self.scheduler.prefix_hit_tokens_total,
                           prompt_tokens=self.prompt_tokens_total,
                           generation_tokens=self.generation_tokens_total)
