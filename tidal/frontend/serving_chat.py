"""`POST /v1/chat/completions`: messages -> chat template -> tokens -> engine -> OpenAI shapes."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

import jinja2
from starlette.requests import Request
from starlette.responses import Response

from tidal.frontend.chat_tokens import encode_text
from tidal.frontend.errors import OpenAIError, bad_request
from tidal.frontend.openai_types import (ChatChoiceLogprobs, ChatChunkEncoder,
                                         ChatCompletionChoice, ChatCompletionChunk,
                                         ChatCompletionRequest, ChatCompletionResponse,
                                         ChatResponseMessage, ChatTokenLogprob, ChatTopLogprob)
from tidal.frontend.serving import (SSE_DONE, GenerationRun, ServingContext, SSEResponse, admit,
                                    build_sampling_params, check_prompt_chars, check_request,
                                    clamp_logprob, json_response, parse_body, resolve_max_tokens,
                                    routing_hints, run_until_disconnect, sse_error, sse_event)
from tidal.frontend.structured_fields import check_structured_output
from tidal.protocol import AddRequest, TokenLogprob

logger = logging.getLogger(__name__)


def chat_template_error(exc: Exception, req: ChatCompletionRequest) -> OpenAIError:
    """The 400 for a chat template that failed on a request. The template's own refusals
    (`raise_exception(...)`, a missing variable) and `ValueError`s are the client's to read; any
    other error (a value of the wrong type in a message or in `chat_template_kwargs`) is named by
    field only, since its text would name the server's own functions."""
    if isinstance(exc, (jinja2.TemplateError, ValueError)):
        return bad_request(f"The chat template refused this request: {exc}", param="messages")
    logger.info("chat template failed: %r", exc)
    if req.chat_template_kwargs:
        return bad_request("The chat template could not be applied to these messages with these "
                           "chat_template_kwargs (a value of the wrong type?).", param="chat_template_kwargs")
    return bad_request("The chat template could not be applied to these messages (a value of the wrong "
                       "type?).", param="messages")


class ChatServing:
    def __init__(self, ctx: ServingContext) -> None:
        self._ctx = ctx

    async def create(self, request: Request) -> Response:
        arrival_time = time.monotonic()
        req = await parse_body(request, ChatCompletionRequest)
        ctx = self._ctx
        check_request(ctx, req)
        await check_structured_output(ctx.tokenizer, req)
        prompt_token_ids = await self._prompt_token_ids(req)
        max_tokens = resolve_max_tokens(ctx.engine.max_model_len, len(prompt_token_ids),
                                        req.requested_max_tokens(), ctx.server.default_max_tokens,
                                        param="messages")
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        add_request = AddRequest(
            request_id=request_id, prompt_token_ids=prompt_token_ids,
            sampling_params=build_sampling_params(req, max_tokens, req.num_logprobs()),
            arrival_time=arrival_time, routing=routing_hints(request, req))
        await admit(ctx, add_request)
        run = GenerationRun(ctx, add_request, skip_special_tokens=req.skip_special_tokens)
        if req.stream:
            return SSEResponse(self._stream(run, req))
        return await run_until_disconnect(request, lambda: self._complete(run, req))

    async def _prompt_token_ids(self, req: ChatCompletionRequest) -> list[int]:
        """The templated prompt's ids; its text checked against the context before tokenizing.
        The client's strings have their special-token text hidden from the tokenizer
        (`SpecialTokenMask`) unless the server parses it."""
        tokenizer, mask = self._ctx.tokenizer, self._ctx.special_token_mask
        messages = [m.template_dict() for m in req.messages]
        check_prompt_chars(self._ctx, sum(len(m["content"]) for m in messages if isinstance(m.get("content"), str)),
                           param="messages")  # before masking and rendering megabytes
        template_kwargs = req.chat_template_kwargs or {}
        tools = req.tools
        if mask is not None:
            messages, tools = mask.hide(messages), mask.hide(tools)
            template_kwargs = mask.hide(template_kwargs)
        try:
            prompt = tokenizer.apply_chat_template(
                messages, add_generation_prompt=req.add_generation_prompt, tools=tools,
                **template_kwargs)
        except Exception as exc:
            raise chat_template_error(exc, req) from None
        check_prompt_chars(self._ctx, len(prompt), param="messages")
        if self._ctx.chat_tokens is not None:
            return await self._ctx.chat_tokens.encode(prompt)
        return await encode_text(tokenizer, prompt, add_special_tokens=False)

    def _logprobs(self, logprobs: list[TokenLogprob] | None,
                  num_top: int) -> ChatChoiceLogprobs | None:
        if logprobs is None:
            return None
        table = self._ctx.token_table
        content = []
        for lp in logprobs:
            text, raw = table.text_and_bytes(lp.token_id)
            top = []
            for token_id, logprob in lp.top[:num_top]:
                top_text, top_raw = table.text_and_bytes(token_id)
                top.append(ChatTopLogprob(token=top_text, logprob=clamp_logprob(logprob),
                                          bytes=top_raw))
            content.append(ChatTokenLogprob(token=text, logprob=clamp_logprob(lp.logprob),
                                            bytes=raw, top_logprobs=top))
        return ChatChoiceLogprobs(content=content)

    async def _complete(self, run: GenerationRun, req: ChatCompletionRequest) -> Response:
        texts: list[str] = []
        logprobs: list[TokenLogprob] | None = [] if req.logprobs else None
        finish_reason = None
        async with aclosing(run.steps()) as steps:
            async for step in steps:
                texts.append(step.text)
                if logprobs is not None and step.logprobs:
                    logprobs.extend(step.logprobs)
                finish_reason = step.finish_reason
        choice = ChatCompletionChoice(
            message=ChatResponseMessage(content="".join(texts)),
            logprobs=self._logprobs(logprobs, req.top_logprobs or 0),
            finish_reason=finish_reason)
        return json_response(ChatCompletionResponse(
            id=run.request.request_id, created=int(time.time()),
            model=self._ctx.served_model_name, choices=[choice], usage=run.usage()))

    async def _stream(self, run: GenerationRun, req: ChatCompletionRequest
                      ) -> AsyncIterator[bytes]:
        created = int(time.time())
        model = self._ctx.served_model_name
        include_usage = req.include_usage
        encoder = ChatChunkEncoder(run.request.request_id, created, model, include_usage)
        want_logprobs, num_top = req.logprobs, req.top_logprobs or 0
        first = True
        try:
            async with aclosing(run.steps()) as steps:
                async for step in steps:
                    text = step.text
                    if first:
                        # The role rides on the first chunk that follows engine output, so a
                        # client timing its first chunk measures a real first token.
                        first = False
                        role = True
                    elif text:
                        role = False
                    elif step.finish_reason is None and not step.logprobs:
                        continue
                    else:
                        role, text = False, None
                    logprobs = self._logprobs(step.logprobs, num_top) if want_logprobs else None
                    yield encoder.chunk(text, role=role, logprobs=logprobs,
                                        finish_reason=step.finish_reason)
            if include_usage:
                chunk = ChatCompletionChunk(id=run.request.request_id, created=created,
                                            model=model, choices=[], usage=run.usage())
                yield sse_event(chunk.model_dump_json())
        except Exception as exc:
            yield sse_error(exc)
        yield SSE_DONE
