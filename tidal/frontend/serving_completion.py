"""`POST /v1/completions`: a text or token-id prompt -> engine -> OpenAI text completions."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

from starlette.requests import Request
from starlette.responses import Response

from tidal.frontend.errors import bad_request
from tidal.frontend.openai_types import (CompletionChoice, CompletionChunkEncoder,
                                         CompletionLogprobs, CompletionRequest,
                                         CompletionResponse)
from tidal.frontend.chat_tokens import encode_text
from tidal.frontend.serving import (SSE_DONE, GenerationRun, ServingContext, SSEResponse, admit,
                                    build_sampling_params, check_prompt_chars, check_request,
                                    check_token_ids,
                                    clamp_logprob, json_response, parse_body,
                                    resolve_max_tokens, routing_hints, run_until_disconnect,
                                    sse_error, sse_event)
from tidal.frontend.structured_fields import check_structured_output
from tidal.protocol import AddRequest, TokenLogprob

DEFAULT_MAX_TOKENS = 16
"""OpenAI's default for text completions (clipped to the context that's left)."""


class CompletionLogprobsBuilder:
    """Accumulates OpenAI's legacy logprobs format; text offsets count from the output start."""

    def __init__(self, ctx: ServingContext) -> None:
        self._table = ctx.token_table
        self._offset = 0

    def build(self, logprobs: list[TokenLogprob]) -> CompletionLogprobs:
        out = CompletionLogprobs()
        for lp in logprobs:
            text = self._table.text(lp.token_id)
            sampled = clamp_logprob(lp.logprob)
            top = {self._table.text(t): clamp_logprob(v) for t, v in lp.top}
            top.setdefault(text, sampled)  # OpenAI always lists the sampled token too
            out.tokens.append(text)
            out.token_logprobs.append(sampled)
            out.top_logprobs.append(top)
            out.text_offset.append(self._offset)
            self._offset += len(text)
        return out


class CompletionServing:
    def __init__(self, ctx: ServingContext) -> None:
        self._ctx = ctx

    async def create(self, request: Request) -> Response:
        arrival_time = time.monotonic()
        req = await parse_body(request, CompletionRequest)
        ctx = self._ctx
        check_request(ctx, req)
        await check_structured_output(ctx.tokenizer, req)
        prompt_token_ids = await self._prompt_token_ids(req)
        cap = ctx.server.default_max_tokens
        max_tokens = resolve_max_tokens(ctx.engine.max_model_len, len(prompt_token_ids), req.max_tokens,
                                        DEFAULT_MAX_TOKENS if cap is None else min(cap, DEFAULT_MAX_TOKENS),
                                        param="prompt")
        add_request = AddRequest(
            request_id=f"cmpl-{uuid.uuid4().hex}", prompt_token_ids=prompt_token_ids,
            sampling_params=build_sampling_params(req, max_tokens, req.logprobs),
            arrival_time=arrival_time, routing=routing_hints(request, req))
        await admit(ctx, add_request)
        run = GenerationRun(ctx, add_request, skip_special_tokens=req.skip_special_tokens)
        if req.stream:
            return SSEResponse(self._stream(run, req))
        return await run_until_disconnect(request, lambda: self._complete(run, req))

    async def _prompt_token_ids(self, req: CompletionRequest) -> list[int]:
        prompt = req.text_or_token_ids()
        if isinstance(prompt, str):
            check_prompt_chars(self._ctx, len(prompt), param="prompt")
            token_ids = await encode_text(self._ctx.tokenizer, prompt, add_special_tokens=True)
        else:
            token_ids = list(prompt)
            check_token_ids(self._ctx, token_ids, param="prompt")
        if not token_ids:
            raise bad_request("The prompt is empty.", param="prompt")
        return token_ids

    def _response(self, run: GenerationRun, created: int, choice: CompletionChoice,
                  usage: bool) -> CompletionResponse:
        return CompletionResponse(id=run.request.request_id, created=created,
                                  model=self._ctx.served_model_name, choices=[choice],
                                  usage=run.usage() if usage else None)

    async def _complete(self, run: GenerationRun, req: CompletionRequest) -> Response:
        texts: list[str] = []
        logprobs: list[TokenLogprob] = []
        finish_reason = None
        async with aclosing(run.steps()) as steps:
            async for step in steps:
                texts.append(step.text)
                if step.logprobs:
                    logprobs.extend(step.logprobs)
                finish_reason = step.finish_reason
        built = None
        if req.logprobs is not None:
            built = CompletionLogprobsBuilder(self._ctx).build(logprobs)
        choice = CompletionChoice(text="".join(texts), logprobs=built,
                                  finish_reason=finish_reason)
        return json_response(self._response(run, int(time.time()), choice, usage=True))

    async def _stream(self, run: GenerationRun, req: CompletionRequest
                      ) -> AsyncIterator[bytes]:
        created = int(time.time())
        encoder = CompletionChunkEncoder(run.request.request_id, created,
                                         self._ctx.served_model_name, req.include_usage)
        logprobs_builder = CompletionLogprobsBuilder(self._ctx)
        try:
            async with aclosing(run.steps()) as steps:
                async for step in steps:
                    if not step.text and step.finish_reason is None and not step.logprobs:
                        continue
                    logprobs = None
                    if req.logprobs is not None:
                        logprobs = logprobs_builder.build(step.logprobs or [])
                    yield encoder.chunk(step.text, logprobs=logprobs,
                                        finish_reason=step.finish_reason)
            if req.include_usage:
                chunk = CompletionResponse(id=run.request.request_id, created=created,
                                           model=self._ctx.served_model_name, choices=[],
                                           usage=run.usage())
                yield sse_event(chunk.model_dump_json())
        except Exception as exc:
            yield sse_error(exc)
        yield SSE_DONE
