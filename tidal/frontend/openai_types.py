"""OpenAI API request and response models (pydantic).

Requests accept the fields of OpenAI's API plus vLLM's common extensions (`top_k`, `min_p`,
`stop_token_ids`, `ignore_eos`, `min_tokens`, `include_stop_str_in_output`,
`skip_special_tokens`, `chat_template_kwargs`) and Tidal's routing fields (`user` as the
session, `priority`, `routing`). Unknown fields are ignored, as vLLM does, so that clients
sending options Tidal doesn't implement (penalties, `tool_choice`, ...) still work. Value checks
that fail here become 400s naming the field before anything reaches the engine: every number a
client sends has bounds here (the routing weights those of `KVWeights`, `priority` the widest any
server allows), and the checks that need the server's state (the context length, the vocabulary,
the server's own priority limit) follow in `serving.check_request`.

Responses mirror OpenAI's shapes field for field. Streamed chunks are not built as models:
`ChatChunkEncoder` and `CompletionChunkEncoder` write the same bytes from a prefix and suffix
fixed per stream, JSON-escaping only what changes per chunk (a model per chunk cost ~10 us of
the frontend's per-token CPU); tests/test_frontend_stream.py holds them equal to the models.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tidal.config import MAX_PRIORITY
from tidal.frontend.structured_fields import StructuredFields
from tidal.router.policy import MAX_KV_TEMPERATURE, MAX_OVERLAP_WEIGHT

MAX_TOP_LOGPROBS = 20
MAX_TEMPERATURE = 100.0
"""Sampling temperature at which the next token is already as good as uniform."""
TEMPLATE_ARGUMENTS = ("messages", "tools", "add_generation_prompt", "chat_template")
"""What the chat template gets from the request itself: not settable through `chat_template_kwargs`
(a template of the client's own would be code the server runs)."""
# Integers cross the request plane as msgpack ints; keep them in range there.
INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


# ---------------------------------------------------------------------------------------------
# requests


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False


class ContentPart(OpenAIBaseModel):
    """One part of a message's content; only text parts are supported."""

    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_only(self) -> ContentPart:
        if self.type != "text":
            raise ValueError(f"content part type {self.type!r} is not supported (only 'text')")
        if self.text is None:
            raise ValueError("a text content part needs a 'text' field")
        return self


class ChatMessage(BaseModel):
    """A chat message. Extra keys (name, tool_calls, tool_call_id) go to the chat template."""

    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[ContentPart] | None = None

    def template_dict(self) -> dict[str, Any]:
        """The message as the chat template sees it: content flattened to one string."""
        message = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            message["content"] = "\n".join(part.text or "" for part in self.content)
        elif self.content is None:
            message["content"] = ""
        return message


class RoutingOptions(OpenAIBaseModel):
    """Tidal extension: per-request weights of the kv routing policy."""

    overlap_weight: float | None = Field(default=None, ge=0.0, le=MAX_OVERLAP_WEIGHT)
    temperature: float | None = Field(default=None, ge=0.0, le=MAX_KV_TEMPERATURE)


class SamplingRequest(OpenAIBaseModel, StructuredFields):
    """Fields shared by chat and text completions (the structured-output ones: `StructuredFields`)."""

    model: str
    n: int = 1
    temperature: float | None = Field(default=None, ge=0.0, le=MAX_TEMPERATURE)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1, le=INT32_MAX)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0, le=INT32_MAX)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # also the routing session when no x-session-id header is sent
    priority: int = Field(default=0, ge=-MAX_PRIORITY, le=MAX_PRIORITY)  # admission order when the router queues
    routing: RoutingOptions | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported")
        return n

    @field_validator("stop_token_ids")
    @classmethod
    def _non_negative_ids(cls, ids: list[int] | None) -> list[int] | None:
        if ids is not None and any(not 0 <= i <= INT32_MAX for i in ids):
            raise ValueError(f"token ids must be between 0 and {INT32_MAX}")
        return ids

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        return tuple(s for s in stops if s)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_variables_only(cls, kwargs: dict[str, Any] | None) -> dict[str, Any] | None:
        for name in TEMPLATE_ARGUMENTS:
            if kwargs is not None and name in kwargs:
                raise ValueError(f"{name!r} cannot be set here (the server's chat template takes it from the "
                                 "request itself)")
        return kwargs

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    def requested_max_tokens(self) -> int | None:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    def num_logprobs(self) -> int | None:
        """SamplingParams.logprobs: None for none, else the number of alternatives."""
        if not self.logprobs:
            return None
        return self.top_logprobs or 0


Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(SamplingRequest):
    prompt: Prompt
    max_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: Prompt) -> Prompt:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ValueError("only one prompt per request is supported")
        if isinstance(prompt, list) and not prompt:
            raise ValueError("prompt must not be empty")
        return prompt

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, echo: bool) -> bool:
        if echo:
            raise ValueError("echo is not supported")
        return echo

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, best_of: int | None) -> int | None:
        if best_of not in (None, 1):
            raise ValueError("only best_of=1 is supported")
        return best_of

    def text_or_token_ids(self) -> str | list[int]:
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        return prompt  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# responses


class PromptTokensDetails(OpenAIBaseModel):
    cached_tokens: int = 0


class UsageInfo(OpenAIBaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class ChatTopLogprob(OpenAIBaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(OpenAIBaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(OpenAIBaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatCompletionChoice(OpenAIBaseModel):
    index: int = 0
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo


class ChatCompletionChunkChoice(OpenAIBaseModel):
    index: int = 0
    delta: dict[str, str]
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionChunkChoice]
    usage: UsageInfo | None = None


class CompletionLogprobs(OpenAIBaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(OpenAIBaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(OpenAIBaseModel):
    """A text completion, and also each streamed chunk (same object, partial text)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ModelCard(OpenAIBaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tidal"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---------------------------------------------------------------------------------------------
# streamed chunks as bytes

_json = msgspec.json.encode  # escapes strings as pydantic does: UTF-8 kept, controls escaped


def _chunk_suffix(include_usage: bool) -> bytes:
    # The models' `usage` field comes last: null in every chunk but the usage one, and left out
    # entirely when the client did not ask for usage.
    return b"}]" + (b',"usage":null' if include_usage else b"") + b"}\n\n"


def _logprobs_json(logprobs: BaseModel | None) -> bytes:
    return b"null" if logprobs is None else logprobs.model_dump_json().encode()


class ChatChunkEncoder:
    """One chat stream's chunks as SSE events: the bytes of `ChatCompletionChunk` with one
    choice, `model_dump_json(exclude={"usage"})` unless `include_usage`."""

    def __init__(self, request_id: str, created: int, model: str, include_usage: bool) -> None:
        self._prefix = (b'data: {"id":' + _json(request_id) + b',"object":"chat.completion.chunk","created":'
                        + _json(created) + b',"model":' + _json(model) + b',"choices":[{"index":0,"delta":')
        self._suffix = _chunk_suffix(include_usage)

    def chunk(self, content: str | None, *, role: bool = False, logprobs: ChatChoiceLogprobs | None = None,
              finish_reason: str | None = None) -> bytes:
        """`content` None: an empty delta; `role`: the delta names the assistant role first."""
        if content is None:
            delta = b"{}"
        elif role:
            delta = b'{"role":"assistant","content":' + _json(content) + b"}"
        else:
            delta = b'{"content":' + _json(content) + b"}"
        return b"".join((self._prefix, delta, b',"logprobs":', _logprobs_json(logprobs), b',"finish_reason":',
                         _json(finish_reason), self._suffix))


class CompletionChunkEncoder:
    """One text-completion stream's chunks as SSE events: the bytes of `CompletionResponse` with
    one choice, `model_dump_json(exclude={"usage"})` unless `include_usage`."""

    def __init__(self, request_id: str, created: int, model: str, include_usage: bool) -> None:
        self._prefix = (b'data: {"id":' + _json(request_id) + b',"object":"text_completion","created":'
                        + _json(created) + b',"model":' + _json(model) + b',"choices":[{"index":0,"text":')
        self._suffix = _chunk_suffix(include_usage)

    def chunk(self, text: str, *, logprobs: CompletionLogprobs | None = None,
              finish_reason: str | None = None) -> bytes:
        return b"".join((self._prefix, _json(text), b',"logprobs":', _logprobs_json(logprobs),
                         b',"finish_reason":', _json(finish_reason), self._suffix))
