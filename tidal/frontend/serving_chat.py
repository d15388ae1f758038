"""`POST /v1/chat/completions`: messages -> chat template -> tokens -> engine -> OpenAI shapes.

Tools and reasoning: `ToolPlan` (tool_calls.py) shapes the prompt and the grammar; where the reply is
parsed (tool calls, <think> reasoning, gpt-oss's harmony channels), a `ChatOutputParser`
(chat_output.py) per choice reads it, and the plain path (`_complete`'s texts, `_stream`'s
`chunk`) is left as it is for the rest."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

import jinja2
from starlette.requests import Request
from starlette.responses import Response

from tidal.frontend.chat_output import ChatOutputFormat, ChatOutputParser
from tidal.frontend.chat_template_features import TemplateFeatures
from tidal.frontend.chat_tokens import encode_text
from tidal.frontend.choices import ChoiceOutput, Choices
from tidal.frontend.errors import OpenAIError, bad_request
from tidal.frontend.harmony import HarmonyParser, harmony_messages, reply_opening
from tidal.frontend.openai_types import (ChatChoiceLogprobs, ChatChunkEncoder,
                                         ChatCompletionChoice, ChatCompletionChunk,
                                         ChatCompletionRequest, ChatCompletionResponse,
                                         ChatResponseMessage, ChatTokenLogprob, ChatTopLogprob,
                                         CompletionTokensDetails, UsageInfo)
from tidal.frontend.reasoning import starts_in_reasoning
from tidal.frontend.serving import (SSE_DONE, ServingContext, SSEResponse, build_sampling_params,
                                    check_prompt_chars, check_request, clamp_logprob, json_response,
                                    parse_body, resolve_max_tokens, routing_hints, run_until_disconnect,
                                    sse_error, sse_event)
from tidal.frontend.tool_calls import ToolPlan
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
        tokenizer = ctx.tokenizer
        self._features = TemplateFeatures.of(getattr(tokenizer, "chat_template", None))
        special_ids = getattr(tokenizer, "all_special_ids", None) or []
        self._special_tokens = frozenset(tokenizer.convert_ids_to_tokens(list(special_ids)))

    async def create(self, request: Request) -> Response:
        arrival_time = time.monotonic()
        req = await parse_body(request, ChatCompletionRequest)
        ctx = self._ctx
        check_request(ctx, req)
        await check_structured_output(ctx.tokenizer, req)
        plan = ToolPlan.for_request(req, self._features, ctx.server.tool_call_parser)
        prompt, prompt_token_ids = await self._prompt(req, plan)
        max_tokens = resolve_max_tokens(ctx.engine.max_model_len, len(prompt_token_ids),
                                        req.requested_max_tokens(), ctx.server.default_max_tokens,
                                        param="messages")
        output = self._output_format(plan, prompt)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        add_request = AddRequest(
            request_id=request_id, prompt_token_ids=prompt_token_ids,
            sampling_params=plan.sampling_params(build_sampling_params(req, max_tokens, req.num_logprobs())),
            arrival_time=arrival_time, routing=routing_hints(request, req))
        # The tags the parsers read stay in the text even where the tokenizer calls them special.
        skip_special = req.skip_special_tokens and not self._special_tokens.intersection(output.markers)
        choices = await Choices.admit(ctx, add_request, req.num_choices, skip_special_tokens=skip_special)
        if req.stream:
            await run_until_disconnect(request, choices.start)
            stream = self._stream_parsed(choices, req, output) if output.parses else self._stream(choices, req)
            return SSEResponse(stream, choices)
        return await run_until_disconnect(request, lambda: self._complete(choices, req, output))

    def _output_format(self, plan: ToolPlan, prompt: str) -> ChatOutputFormat:
        mode = self._ctx.server.reasoning_parser
        if mode == "harmony" or plan.parser_name == "harmony":
            return _harmony_format(plan, prompt)
        reasoning = None if mode == "none" else mode
        return ChatOutputFormat(tools=plan.parser_factory(), reasoning=reasoning,
                                in_reasoning=reasoning is not None and starts_in_reasoning(reasoning, prompt),
                                tool_markers=plan.markers)

    def _template_kwargs(self, req: ChatCompletionRequest) -> dict:
        kwargs = req.chat_template_kwargs or {}
        if req.reasoning_effort is not None:
            if not self._features.reads_reasoning_effort:
                raise bad_request("reasoning_effort is not supported for this model (its chat template "
                                  "takes no reasoning_effort)", param="reasoning_effort")
            kwargs = {**kwargs, "reasoning_effort": req.reasoning_effort}
        return kwargs

    async def prompt_token_ids(self, req: ChatCompletionRequest) -> list[int]:
        """The prompt ids `create` would send to the engine for `req` (`/tokenize`)."""
        plan = ToolPlan.for_request(req, self._features, self._ctx.server.tool_call_parser)
        return (await self._prompt(req, plan))[1]

    async def _prompt(self, req: ChatCompletionRequest, plan: ToolPlan) -> tuple[str, list[int]]:
        """The templated prompt and its ids; its text checked against the context before tokenizing.
        The client's strings have their special-token text hidden from the tokenizer
        (`SpecialTokenMask`) unless the server parses it."""
        tokenizer, mask = self._ctx.tokenizer, self._ctx.special_token_mask
        messages = [m.template_dict() for m in req.messages]
        check_prompt_chars(self._ctx, sum(len(m["content"]) for m in messages if isinstance(m.get("content"), str)),
                           param="messages")  # before masking and rendering megabytes
        template_kwargs = self._template_kwargs(req)
        tools = plan.tools
        if mask is not None:
            messages, tools = mask.hide(messages), mask.hide(tools)
            template_kwargs = mask.hide(template_kwargs)
        messages = plan.template_messages(messages, tools)
        if self._features.tool_call_format == "harmony":
            messages = harmony_messages(messages)
        try:
            prompt = tokenizer.apply_chat_template(
                messages, add_generation_prompt=req.add_generation_prompt, tools=tools,
                **template_kwargs)
        except Exception as exc:
            raise chat_template_error(exc, req) from None
        check_prompt_chars(self._ctx, len(prompt), param="messages")
        if self._ctx.chat_tokens is not None:
            return prompt, await self._ctx.chat_tokens.encode(prompt)
        return prompt, await encode_text(tokenizer, prompt, add_special_tokens=False)

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

    async def _complete(self, choices: Choices, req: ChatCompletionRequest,
                        output: ChatOutputFormat) -> Response:
        outputs = [ChoiceOutput(i) for i in range(len(choices.runs))]
        parsers = [output.parser() if output.parses else None for _ in outputs]
        async with aclosing(choices.steps()) as steps:
            async for index, step in steps:
                outputs[index].add(step)
                parser = parsers[index]
                if parser is not None:
                    parser.feed(step.text, len(step.token_ids))
                    if step.finish_reason is not None:  # the choice's last step: its reason, tool_calls too,
                        _, reason = parser.finish(step.finish_reason)  # reaches the run's metrics and log
                        outputs[index].finish_reason = choices.runs[index].finish_reason = reason
        response_choices = []
        for out, parser in zip(outputs, parsers):
            finish_reason = out.finish_reason
            message = ChatResponseMessage(content=out.text) if parser is None else parser.message()
            response_choices.append(ChatCompletionChoice(
                index=out.index, message=message,
                logprobs=self._logprobs(out.logprobs, req.top_logprobs or 0) if req.logprobs else None,
                finish_reason=finish_reason))
        return json_response(ChatCompletionResponse(
            id=choices.request_id, created=int(time.time()),
            model=self._ctx.served_model_name, choices=response_choices, usage=_usage(choices, parsers)))

    async def _stream(self, choices: Choices, req: ChatCompletionRequest) -> AsyncIterator[bytes]:
        created = int(time.time())
        model = self._ctx.served_model_name
        include_usage = req.include_usage
        encoders = [ChatChunkEncoder(choices.request_id, created, model, include_usage, index=i)
                    for i in range(len(choices.runs))]
        want_logprobs, num_top = req.logprobs, req.top_logprobs or 0
        first = [True] * len(encoders)  # per choice: its first chunk is still to come
        try:
            async with aclosing(choices.steps()) as steps:
                async for index, step in steps:
                    text = step.text
                    if first[index]:
                        # The role rides on the first chunk that follows engine output, so a
                        # client timing its first chunk measures a real first token.
                        first[index] = False
                        role = True
                    elif text:
                        role = False
                    elif step.finish_reason is None and not step.logprobs:
                        continue
                    else:
                        role, text = False, None
                    logprobs = self._logprobs(step.logprobs, num_top) if want_logprobs else None
                    yield encoders[index].chunk(text, role=role, logprobs=logprobs,
                                                finish_reason=step.finish_reason)
            if include_usage:
                chunk = ChatCompletionChunk(id=choices.request_id, created=created,
                                            model=model, choices=[], usage=choices.usage())
                yield sse_event(chunk.model_dump_json())
        except Exception as exc:
            yield sse_error(exc)
        yield SSE_DONE

    async def _stream_parsed(self, choices: Choices, req: ChatCompletionRequest,
                             output: ChatOutputFormat) -> AsyncIterator[bytes]:
        """`_stream` for replies a parser reads (one per choice): each step's deltas (reasoning, content,
        tool calls) as chunks; the step's logprobs ride on its first chunk, its finish reason on its last."""
        created = int(time.time())
        model = self._ctx.served_model_name
        num_choices = len(choices.runs)
        encoders = [ChatChunkEncoder(choices.request_id, created, model, req.include_usage, index=i)
                    for i in range(num_choices)]
        want_logprobs, num_top = req.logprobs, req.top_logprobs or 0
        parsers = [output.parser() for _ in range(num_choices)]
        first = [True] * num_choices
        try:
            async with aclosing(choices.steps()) as steps:
                async for index, step in steps:
                    parser = parsers[index]
                    deltas = parser.feed(step.text, len(step.token_ids))
                    finish_reason = None
                    if step.finish_reason is not None:
                        end, finish_reason = parser.finish(step.finish_reason)
                        choices.runs[index].finish_reason = finish_reason  # tool_calls: its metrics, log
                        deltas += end
                    logprobs = self._logprobs(step.logprobs, num_top) if want_logprobs else None
                    if first[index]:  # the role rides on the first chunk, as in `_stream`
                        first[index] = False
                        deltas[:1] = [{"role": "assistant", **(deltas[0] if deltas else {"content": ""})}]
                    elif not deltas and finish_reason is None and logprobs is None:
                        continue
                    for i, delta in enumerate(deltas or [{}]):
                        yield encoders[index].delta_chunk(
                            delta, logprobs=logprobs if i == 0 else None,
                            finish_reason=finish_reason if i == max(len(deltas), 1) - 1 else None)
            if req.include_usage:
                chunk = ChatCompletionChunk(id=choices.request_id, created=created,
                                            model=model, choices=[], usage=_usage(choices, parsers))
                yield sse_event(chunk.model_dump_json())
        except Exception as exc:
            yield sse_error(exc)
        yield SSE_DONE


def _harmony_format(plan: ToolPlan, prompt: str) -> ChatOutputFormat:
    """Harmony replies (gpt-oss) are read by channel; a forced tool choice is JSON a grammar wrote
    in place of the harmony messages, read as the plan reads it."""
    if plan.choice in ("required", "function"):
        return ChatOutputFormat(tools=plan.parser_factory())
    calls = plan.choice == "auto" and bool(plan.tools)
    max_calls = None if plan.parallel else 1
    opening = reply_opening(prompt)
    return ChatOutputFormat(harmony=lambda: HarmonyParser(calls, max_calls, opening))


def _usage(choices: Choices, parsers: list[ChatOutputParser | None]) -> UsageInfo:
    """The choices' usage, with the reasoning tokens where a reasoning parser read the replies."""
    usage = choices.usage()
    counts = [p.reasoning_tokens for p in parsers if p is not None and p.reasoning_tokens is not None]
    if counts:
        usage.completion_tokens_details = CompletionTokensDetails(reasoning_tokens=sum(counts))
    return usage
