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
from tidal.frontend.choices import Choices, most_likely
from tidal.frontend.serving import (SSE_DONE, ServingContext, SSEResponse, build_sampling_params,
                                    check_prompt_chars, check_request, check_token_ids, clamp_logprob,
                                    json_response, parse_body, resolve_max_tokens, routing_hints,
                                    run_until_disconnect, sse_error, sse_event)
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
        # best_of ranks its samples by cumulative logprob: the engine reports the sampled tokens' own
        ranked = req.num_samples > req.num_choices
        logprobs = 0 if ranked and req.logprobs is None else req.logprobs
        add_request = AddRequest(
            request_id=f"cmpl-{uuid.uuid4().hex}", prompt_token_ids=prompt_token_ids,
            sampling_params=build_sampling_params(req, max_tokens, logprobs),
            arrival_time=arrival_time, routing=routing_hints(request, req))
        choices = await Choices.admit(ctx, add_request, req.num_samples, skip_special_tokens=req.skip_special_tokens)
        echo = self._echo_text(req, prompt_token_ids) if req.echo else ""
        if req.stream:
            await run_until_disconnect(request, choices.start)
            return SSEResponse(self._stream(choices, req, echo), choices)
        return await run_until_disconnect(request, lambda: self._complete(choices, req, echo))

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

    def _echo_text(self, req: CompletionRequest, prompt_token_ids: list[int]) -> str:
        """`echo`: the prompt as the client wrote it, or its token ids' text (special tokens shown)."""
        prompt = req.text_or_token_ids()
        if isinstance(prompt, str):
            return prompt
        return self._ctx.tokenizer.decode(prompt_token_ids, skip_special_tokens=False)

    async def _complete(self, choices: Choices, req: CompletionRequest, echo: str) -> Response:
        outputs = await choices.collect()
        if len(outputs) > req.num_choices:
            outputs = most_likely(outputs, req.num_choices)  # best_of
        response_choices = [CompletionChoice(
            index=out.index, text=echo + out.text, finish_reason=out.finish_reason,
            logprobs=CompletionLogprobsBuilder(self._ctx).build(out.logprobs) if req.logprobs is not None else None)
            for out in outputs]
        return json_response(CompletionResponse(id=choices.request_id, created=int(time.time()),
                                                model=self._ctx.served_model_name, choices=response_choices,
                                                usage=choices.usage()))

    async def _stream(self, choices: Choices, req: CompletionRequest, echo: str) -> AsyncIterator[bytes]:
        created = int(time.time())
        model = self._ctx.served_model_name
        num_choices = len(choices.runs)  # no best_of with stream: every run is a choice
        encoders = [CompletionChunkEncoder(choices.request_id, created, model, req.include_usage, index=i)
                    for i in range(num_choices)]
        logprobs_builders = [CompletionLogprobsBuilder(self._ctx) for _ in range(num_choices)]
        echoes = [echo] * num_choices  # per choice: the prompt text its first chunk still owes
        try:
            async with aclosing(choices.steps()) as steps:
                async for index, step in steps:
                    text = step.text
                    if echoes[index]:
                        text, echoes[index] = echoes[index] + text, ""
                    elif not text and step.finish_reason is None and not step.logprobs:
                        continue
                    logprobs = None
                    if req.logprobs is not None:
                        logprobs = logprobs_builders[index].build(step.logprobs or [])
                    yield encoders[index].chunk(text, logprobs=logprobs, finish_reason=step.finish_reason)
            if req.include_usage:
                chunk = CompletionResponse(id=choices.request_id, created=created, model=model, choices=[],
                                           usage=choices.usage())
                yield sse_event(chunk.model_dump_json())
        except Exception as exc:
            yield sse_error(exc)
        yield SSE_DONE
