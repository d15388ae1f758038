"""The request lifecycle shared by chat and text completions.

`GenerationRun` owns one request's trip through the engine: it submits the `AddRequest`,
turns each `TokenDelta` into stable text (`OutputAssembler`), ends the request at a stop
string, records metrics, and in every case closes the engine iterator, which aborts the
request in the engine if it has not finished (client gone, stop string, error). Nothing that
fails validation reaches it: the endpoint code checks everything first.

The endpoint modules (`serving_chat`, `serving_completion`) build the prompt and shape the
OpenAI responses; the helpers here parse bodies, check the model and the context length,
map request fields to `SamplingParams`, format server-sent events, and cancel a
non-streaming request when its client disconnects.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import anyio
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from tidal.config import ServerConfig
from tidal.frontend.chat_tokens import ChatTokenCache
from tidal.frontend.deadline import DeadlineExceeded, RequestDeadline
from tidal.frontend.detokenizer import OutputAssembler, TokenTextTable
from tidal.errors import EngineDeadError, OverloadedError
from tidal.frontend.engine_client import EngineClient
from tidal.frontend.errors import (OpenAIError, bad_request, engine_unavailable,
                                   from_validation_error, internal_error, model_not_found, overloaded)
from tidal.frontend.special_token_mask import SpecialTokenMask
from tidal.frontend.metrics import FrontendMetrics
from tidal.frontend.request_log import RequestLog
from tidal.frontend.openai_types import PromptTokensDetails, SamplingRequest, UsageInfo
from tidal.frontend.structured_fields import structured_output
from tidal.protocol import AddRequest, RoutingHints, SamplingParams, TokenDelta, TokenLogprob

logger = logging.getLogger(__name__)

T = TypeVar("T")
ModelT = TypeVar("ModelT", bound=BaseModel)

MIN_LOGPROB = -9999.0
"""Stands in for -inf (JSON has no infinities), as OpenAI does."""

SSE_DONE = b"data: [DONE]\n\n"


class EngineRequestError(RuntimeError):
    """The engine reported an error for one request (the engine itself lives on)."""


class ClientDisconnected(Exception):
    """The client went away before a non-streaming response was ready."""


@dataclass(frozen=True)
class ServingContext:
    """What every endpoint needs; built once per app."""

    engine: EngineClient
    tokenizer: Any
    served_model_name: str
    metrics: FrontendMetrics
    token_table: TokenTextTable
    chat_tokens: ChatTokenCache | None = None  # chat prompts a turn at a time (None: whole texts)
    server: ServerConfig = field(default_factory=ServerConfig)  # the request limits
    special_token_mask: SpecialTokenMask | None = None  # None: client text may hold control tokens
    max_request_priority: int = 0  # clients may set `priority` within [-this, this]
    request_log: RequestLog = field(default_factory=lambda: RequestLog(enabled=False))
    created: int = field(default_factory=lambda: int(time.time()))


# ---------------------------------------------------------------------------------------------
# validation helpers


async def parse_body(request: Request, model: type[ModelT]) -> ModelT:
    body = await request.body()
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


def check_request(ctx: ServingContext, req: SamplingRequest) -> None:
    """Checks that need the server's state; raises `OpenAIError`."""
    if req.model != ctx.served_model_name:
        raise model_not_found(req.model)
    if abs(req.priority) > ctx.max_request_priority:
        limit = ctx.max_request_priority
        allowed = f"must be between {-limit} and {limit}" if limit else "can't be set by clients"
        raise bad_request(f"priority {allowed} on this server (frontend.max_request_priority), "
                          f"got {req.priority}", param="priority")
    if not ctx.engine.is_healthy():
        raise engine_unavailable()
    vocab_size = getattr(ctx.tokenizer, "vocab_size", None)
    if req.stop_token_ids and vocab_size is not None:
        if any(t >= vocab_size for t in req.stop_token_ids):
            raise bad_request(f"stop_token_ids must be below the vocabulary size {vocab_size}",
                              param="stop_token_ids")
    if req.logit_bias and vocab_size is not None:
        outside = [k for k in req.logit_bias if int(k) >= vocab_size]
        if outside:
            raise bad_request(f"logit_bias token id {outside[0]} is outside the vocabulary (size {vocab_size})",
                              param="logit_bias")
    num_samples = getattr(req, "num_samples", req.num_choices)  # best_of, for text completions
    if num_samples > ctx.server.max_n:
        param = "n" if num_samples == req.num_choices else "best_of"
        raise bad_request(f"{param} must be at most {ctx.server.max_n} on this server (frontend.max_n), "
                          f"got {num_samples}", param=param)


def check_prompt_chars(ctx: ServingContext, num_chars: int, param: str) -> None:
    """400 for a prompt text too long to fit the context whatever its tokens (checked before
    tokenizing it: `ServerConfig.prompt_chars_per_token`)."""
    max_model_len = ctx.engine.max_model_len
    limit = max_model_len * ctx.server.prompt_chars_per_token
    if max_model_len and num_chars > limit:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, your prompt "
            f"has {num_chars} characters, more than the {limit} that {max_model_len} tokens can hold. "
            f"Please reduce the length of the prompt.", param=param)


def check_token_ids(ctx: ServingContext, token_ids: list[int], param: str) -> None:
    vocab_size = getattr(ctx.tokenizer, "vocab_size", None)
    bad = [t for t in token_ids if t < 0 or (vocab_size is not None and t >= vocab_size)]
    if bad:
        raise bad_request(f"token id {bad[0]} is outside the vocabulary (size {vocab_size})",
                          param=param)


def resolve_max_tokens(max_model_len: int, num_prompt_tokens: int, requested: int | None,
                       default: int | None, param: str) -> int:
    """The request's output budget; 400 when prompt + output would not fit the context.

    `requested` None means the client didn't say: use `default` (None: all that's left),
    clipped to what's left.
    """
    left = max_model_len - num_prompt_tokens
    if requested is None:
        if left < 1:
            raise bad_request(
                f"This model's maximum context length is {max_model_len} tokens. However, "
                f"your prompt has {num_prompt_tokens} tokens, which leaves no room for the "
                f"completion. Please reduce the length of the prompt.", param=param)
        return left if default is None else min(default, left)
    if requested > left:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {num_prompt_tokens + requested} tokens ({num_prompt_tokens} in the "
            f"prompt, {requested} for the completion). Please reduce the length of the "
            f"prompt or max_tokens.", param="max_tokens")
    return requested


def build_sampling_params(req: SamplingRequest, max_tokens: int,
                          logprobs: int | None) -> SamplingParams:
    """The request's `SamplingParams`; `OpenAIError` 400 for a structured output the grammar library refuses."""
    top_k = req.top_k if req.top_k is not None and req.top_k > 0 else 0
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=top_k,
        min_p=0.0 if req.min_p is None else req.min_p,
        seed=req.seed,
        stop=req.stop_strings(),
        stop_token_ids=tuple(req.stop_token_ids or ()),
        include_stop_str_in_output=req.include_stop_str_in_output,
        ignore_eos=req.ignore_eos,
        min_tokens=req.min_tokens,
        logprobs=logprobs,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        logit_bias=req.logit_bias_pairs(),
        structured=structured_output(req),
    )


def routing_hints(request: Request, req: SamplingRequest) -> RoutingHints | None:
    """Session (`x-session-id` header, else `prompt_cache_key`, else `user`), priority and kv-routing
    options."""
    session_id = request.headers.get("x-session-id") or req.prompt_cache_key or req.user
    options = req.routing
    if not session_id and not req.priority and options is None:
        return None
    return RoutingHints(session_id=session_id, priority=req.priority,
                        overlap_weight=options.overlap_weight if options else None,
                        temperature=options.temperature if options else None)


async def admit(ctx: ServingContext, request: AddRequest) -> None:
    """Lets an engine that queues (the router) admit or refuse the request before any response
    starts, so a refusal is a plain 503 with Retry-After, streaming or not."""
    admit_fn = getattr(ctx.engine, "admit", None)
    if admit_fn is None:
        return
    try:
        await admit_fn(request)
    except OverloadedError as exc:
        ctx.metrics.requests["rejected"].inc()
        raise overloaded(str(exc), exc.retry_after_s) from None


def clamp_logprob(logprob: float) -> float:
    if math.isnan(logprob) or logprob < MIN_LOGPROB:
        return MIN_LOGPROB
    return logprob


# ---------------------------------------------------------------------------------------------
# one request through the engine


@dataclass(slots=True)
class TextStep:
    """What one engine step added to a request's output."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None


class GenerationRun:
    """One request's engine stream turned into text steps.

    Lifecycle: `start()` (streams only) waits for the first step; `steps()` is iterated once
    and ends after the step that carries a finish_reason. Closing it early (client gone), or
    `aclose()`, closes the engine iterator, which aborts the request. Counters
    (`num_generated_tokens`, `num_cached_tokens`) are final once `steps()` has ended; so is
    `finish_reason`, the one the client sees, which the endpoint may change while it handles the
    step that carries it (the chat layer's `tool_calls`): the request's metrics and its request-log
    line take it when the engine stream ends.
    """

    def __init__(self, ctx: ServingContext, request: AddRequest, *,
                 skip_special_tokens: bool = True) -> None:
        self._ctx = ctx
        self.request = request
        params = request.sampling_params
        hidden = set(params.stop_token_ids)
        hidden.update(getattr(ctx.tokenizer, "eos_token_ids", None) or ())
        self._assembler = OutputAssembler(
            ctx.tokenizer, request.prompt_token_ids, stop=params.stop,
            include_stop_str_in_output=params.include_stop_str_in_output,
            hidden_token_ids=hidden, skip_special_tokens=skip_special_tokens)
        self.num_prompt_tokens = len(request.prompt_token_ids)
        self.num_generated_tokens = 0
        self.num_cached_tokens = 0
        self.finish_reason: str | None = None
        self._first_output_time: float | None = None
        self._last_output_time: float | None = None
        self._route_of = route_of = getattr(ctx.engine, "route_of", None)  # a router's: where it runs
        self._route = route_of(request.request_id) if route_of is not None else None  # admitted: planned
        self._deadline = RequestDeadline(ctx.server.request_deadline_s, request.arrival_time)
        self._steps: AsyncIterator[TextStep] | None = None
        self._first: TextStep | None = None  # the step `start()` waited for, not yet handed out

    def usage(self) -> UsageInfo:
        return UsageInfo(
            prompt_tokens=self.num_prompt_tokens,
            completion_tokens=self.num_generated_tokens,
            total_tokens=self.num_prompt_tokens + self.num_generated_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=self.num_cached_tokens))

    async def start(self) -> None:
        """Waits for the request's first step, so that a refusal before any output (a first-token
        deadline in an overloaded worker's queue, a dead engine) becomes the response's own status
        (503 with Retry-After, ...) and not an error event inside a stream that already said 200.
        A streaming response starts after this: its headers leave with its first token, which is
        when they would be read anyway."""
        self._steps = self._run()
        try:
            self._first = await anext(self._steps)
        except StopAsyncIteration:
            pass
        except BaseException:
            await self._steps.aclose()
            raise

    async def steps(self) -> AsyncIterator[TextStep]:
        """The request's text steps; they follow the one `start()` waited for, if it was called."""
        if self._steps is None:
            self._steps = self._run()
        try:
            if self._first is not None:
                first, self._first = self._first, None
                yield first
            async for step in self._steps:
                yield step
        finally:
            await self._steps.aclose()  # aborts the engine request unless it finished

    async def aclose(self) -> None:
        """Aborts the engine request unless it finished (a no-op once `steps()` has ended)."""
        if self._steps is not None:
            await self._steps.aclose()

    async def _run(self) -> AsyncIterator[TextStep]:
        metrics = self._ctx.metrics
        metrics.prompt_tokens.inc(self.num_prompt_tokens)
        status = "abort"
        failure: Exception | None = None
        stream = self._ctx.engine.generate(self.request)
        finished = False
        deadline = self._deadline
        deadline.arm()
        try:
            while True:
                try:
                    delta = await deadline.next_delta(stream)
                except StopAsyncIteration:
                    break
                if finished:
                    continue  # nothing may follow the last step; let the engine stream end
                step = self._on_delta(delta)
                if step.finish_reason is not None:
                    finished = True
                    self.finish_reason = step.finish_reason
                    if self._route_of is not None:
                        self._route = self._route_of(self.request.request_id) or self._route  # moved since?
                    deadline.disarm()
                    status = "abort" if step.finish_reason == "abort" else "success"
                    if status == "success":
                        metrics.e2e_s.observe(time.monotonic() - self.request.arrival_time)
                    yield step
                    if not delta.finished:
                        return  # a stop string ended it: closing the engine stream aborts it
                    continue  # the engine finished it: its stream ends by itself
                yield step
            if not finished:
                raise EngineRequestError("the engine ended the request's stream unfinished")
        except OverloadedError as exc:
            status, failure = "rejected", exc  # shed before its first token (`admission.first_delta`)
            raise
        except Exception as exc:
            status, failure = "error", exc
            raise
        finally:
            deadline.disarm()
            # Aborts the request in the engine unless it finished; shielded so that a
            # cancelled caller (client disconnect) still frees the engine's KV blocks.
            with anyio.CancelScope(shield=True):
                await stream.aclose()
            self._record(status, failure)

    def _record(self, status: str, failure: Exception | None) -> None:
        """The request's end in the metrics and the request log (once, when `steps()` ends)."""
        metrics = self._ctx.metrics
        metrics.requests[status].inc()
        if status != "success":
            self.finish_reason = status  # abort (client gone, or the engine aborted it), error, rejected
        if status != "rejected":  # a request shed before its first token never finished
            metrics.count_finish(self.finish_reason)
        known = known_error(failure) if failure is not None else None
        http_status = 200 if status == "success" else 499 if status == "abort" else (
            known.status_code if known is not None else 500)
        first = self._first_output_time
        arrival = self.request.arrival_time
        self._ctx.request_log.finished(
            self.request.request_id, http_status, self.finish_reason, self._route, self.num_prompt_tokens,
            self.num_cached_tokens, self.num_generated_tokens, first - arrival if first is not None else None,
            time.monotonic() - arrival)

    def _on_delta(self, delta: TokenDelta) -> TextStep:
        if delta.error is not None or delta.finish_reason == "error":
            raise EngineRequestError(delta.error or "the engine failed this request")
        metrics = self._ctx.metrics
        now = time.monotonic()
        if delta.new_token_ids:
            if self._last_output_time is None:
                metrics.ttft_s.observe(now - self.request.arrival_time)
                self._first_output_time = now
            else:
                metrics.itl_s.observe(now - self._last_output_time)
            self._last_output_time = now
        if delta.num_cached_tokens > self.num_cached_tokens:
            metrics.prefix_cache_hit_tokens.inc(delta.num_cached_tokens - self.num_cached_tokens)
            self.num_cached_tokens = delta.num_cached_tokens
        out = self._assembler.add(delta.new_token_ids, delta.finished, delta.finish_reason)
        self.num_generated_tokens += out.num_tokens
        metrics.generation_tokens.inc(out.num_tokens)
        if out.stopped:
            finish_reason: str | None = "stop"
        elif delta.finished:
            finish_reason = delta.finish_reason or "stop"
        else:
            finish_reason = None
        token_ids, logprobs = delta.new_token_ids, delta.logprobs
        if out.num_tokens < len(token_ids):  # a stop string ended the output inside this step
            token_ids = token_ids[:out.num_tokens]
            logprobs = logprobs[:out.num_tokens] if logprobs is not None else None
        return TextStep(out.text, token_ids, logprobs, finish_reason)


def error_for(exc: Exception) -> OpenAIError:
    """The client-facing error for an exception raised while a request runs."""
    known = known_error(exc)
    if known is not None:
        return known
    logger.exception("request failed", exc_info=exc)
    return internal_error()  # the log has the traceback; the client gets no internals


def known_error(exc: Exception) -> OpenAIError | None:
    """The client-facing error for an exception the server expects (None: a bug, a 500)."""
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, OverloadedError):
        return overloaded(str(exc), exc.retry_after_s)
    if isinstance(exc, EngineDeadError):
        return engine_unavailable(f"The engine stopped: {exc}" if str(exc) else
                                  "The engine stopped.")
    if isinstance(exc, EngineRequestError):
        return internal_error(f"The engine failed this request: {exc}")
    if isinstance(exc, DeadlineExceeded):
        return OpenAIError(408, str(exc), error_type="TimeoutError", code="request_timeout")
    return None


# ---------------------------------------------------------------------------------------------
# transport helpers


def sse_event(payload: str | bytes) -> bytes:
    if isinstance(payload, str):
        payload = payload.encode()
    return b"data: " + payload + b"\n\n"


def sse_error(exc: Exception) -> bytes:
    return sse_event(json.dumps(error_for(exc).body()))


class Closable(Protocol):
    """What a streamed response closes after its body: the request's runs (`GenerationRun`, `Choices`)."""

    async def aclose(self) -> None: ...


class SSEResponse(Response):
    """Server-sent events whose body iterator is always closed, even when abandoned.

    The body streams on the request's own task; a watcher task cancels it when the client
    disconnects (uvicorn's ASGI 2.3 `send` does not fail on a closed connection). If the body
    iterator was waiting at a `yield` it would otherwise be left suspended until garbage
    collection, and the engine request behind it would keep running.
    """

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes], run: Closable | None = None) -> None:
        self.body_iterator = content
        self._run = run  # closed with the body: started runs whose body never ran are aborted too
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(self._cancel_on_disconnect, receive, group.cancel_scope)
                await self._stream(send)
                group.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
                if self._run is not None:
                    await self._run.aclose()

    async def _stream(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        async for chunk in self.body_iterator:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    @staticmethod
    async def _cancel_on_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
        await _wait_for_disconnect(receive)
        scope.cancel()


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def run_until_disconnect(request: Request, work: Callable[[], Awaitable[T]]) -> T:
    """Runs `work()`; cancels it (aborting its engine request) if the client disconnects."""
    work_task = asyncio.ensure_future(work())
    watch_task = asyncio.ensure_future(_wait_for_disconnect(request.receive))
    try:
        await asyncio.wait({work_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        work_task.cancel()  # no-op when done
        watch_task.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(work_task, watch_task, return_exceptions=True)
    if work_task.cancelled():
        raise ClientDisconnected()
    return work_task.result()


def json_response(model: BaseModel, status_code: int = 200) -> Response:
    return Response(model.model_dump_json(), status_code=status_code,
                    media_type="application/json")
