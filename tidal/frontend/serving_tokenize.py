"""`POST /tokenize` and `POST /detokenize`, in vLLM's request and response shapes.

    /tokenize    {"model"?, "prompt", "add_special_tokens"?: true, "return_token_strs"?}
                 {"model"?, "messages", "add_generation_prompt"?, "add_special_tokens"?: false,
                  "chat_template_kwargs"?, "tools"?, "return_token_strs"?}
                 -> {"count", "max_model_len", "tokens", "token_strs"}
    /detokenize  {"model"?, "tokens"} -> {"prompt"}

A chat request's ids are exactly those `/v1/chat/completions` would send to the engine (the same
template, special-token masking and tokenization: `ChatServing`'s own), so a client can count a
conversation's tokens before sending it. Inputs are bounded like prompts: text by
`check_prompt_chars` before it is tokenized, ids by the vocabulary and the context length. Fields
these endpoints do not implement (vLLM's `continue_final_message`, a client's `chat_template`, ...)
are a 400 naming them. Nothing here reaches the engine.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from tidal.frontend.chat_tokens import encode_text
from tidal.frontend.errors import bad_request, from_validation_error, model_not_found
from tidal.frontend.openai_types import ChatCompletionRequest, ChatMessage
from tidal.frontend.serving import ServingContext, check_prompt_chars, check_token_ids, json_response
from tidal.frontend.serving_chat import ChatServing

DECODE_IN_THREAD_TOKENS = 4096
"""Longer id lists are decoded on a worker thread, so the event loop keeps streaming meanwhile."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class TokenizeCompletionRequest(_Strict):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(_Strict):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    add_special_tokens: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizeServing:
    def __init__(self, ctx: ServingContext, chat: ChatServing) -> None:
        self._ctx = ctx
        self._chat = chat

    async def tokenize(self, request: Request) -> Response:
        data = await _json_object(request)
        model = TokenizeChatRequest if "messages" in data else TokenizeCompletionRequest
        req = _validate(model, data)
        self._check_model(req.model)
        if isinstance(req, TokenizeChatRequest):
            tokens = await self._chat_token_ids(req)
        else:
            check_prompt_chars(self._ctx, len(req.prompt), param="prompt")
            tokens = await encode_text(self._ctx.tokenizer, req.prompt, add_special_tokens=req.add_special_tokens)
        strs = None
        if req.return_token_strs:
            strs = list(self._ctx.tokenizer.convert_ids_to_tokens(tokens))
        return json_response(TokenizeResponse(count=len(tokens), max_model_len=self._ctx.engine.max_model_len,
                                              tokens=tokens, token_strs=strs))

    async def detokenize(self, request: Request) -> Response:
        req = _validate(DetokenizeRequest, await _json_object(request))
        self._check_model(req.model)
        max_model_len = self._ctx.engine.max_model_len
        if max_model_len and len(req.tokens) > max_model_len:
            raise bad_request(f"{len(req.tokens)} tokens are more than the model's maximum context length "
                              f"of {max_model_len}.", param="tokens")
        check_token_ids(self._ctx, req.tokens, param="tokens")
        decode = self._ctx.tokenizer.decode
        if len(req.tokens) > DECODE_IN_THREAD_TOKENS:
            text = await asyncio.to_thread(decode, req.tokens, skip_special_tokens=False)
        else:
            text = decode(req.tokens, skip_special_tokens=False)
        return json_response(DetokenizeResponse(prompt=text))

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self._ctx.served_model_name:
            raise model_not_found(model)

    async def _chat_token_ids(self, req: TokenizeChatRequest) -> list[int]:
        if req.add_special_tokens:
            raise bad_request("add_special_tokens must be false with messages: the chat template writes the "
                              "special tokens itself.", param="add_special_tokens")
        chat = _validate(ChatCompletionRequest, {
            "model": self._ctx.served_model_name, "messages": req.messages, "tools": req.tools,
            "add_generation_prompt": req.add_generation_prompt, "chat_template_kwargs": req.chat_template_kwargs})
        return await self._chat.prompt_token_ids(chat)


async def _json_object(request: Request) -> dict[str, Any]:
    try:
        data = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"Invalid JSON body: {exc}") from None
    if not isinstance(data, dict):
        raise bad_request("The body must be a JSON object.")
    return data


def _validate(model: type[BaseModel], data: dict[str, Any]):
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise from_validation_error(exc) from None
