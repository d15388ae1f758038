"""OpenAI API request and response models (pydantic).

Requests accept the fields of OpenAI's API plus vLLM's common extensions (`top_k`, `min_p`,
`repetition_penalty`, `stop_token_ids`, `ignore_eos`, `min_tokens`, `include_stop_str_in_output`,
`skip_special_tokens`, `chat_template_kwargs`) and Tidal's routing fields (`user` or
`prompt_cache_key` as the session, `priority`, `routing`). A field a request model does not declare is
refused (`extra="forbid"`: a 400 "Unrecognized request argument supplied: NAME", param NAME), so no
option is silently ignored; OpenAI fields Tidal has no use for are declared and accepted only at the
value that asks nothing of it (`NO_OP_VALUES`: `store` false, `service_tier` "auto", ...), any other
value a 400 naming the field. Value checks that fail here become 400s naming the field before
anything reaches the engine: every number a client sends has bounds here (the routing weights those
of `KVWeights`, `priority` the widest any server allows), and the checks that need the server's state
(the context length, the vocabulary, the server's own priority and `n` limits) follow in
`serving.check_request`. README.md's table of request fields says which are implemented. Tool
calling (`tools`, `tool_choice`, `parallel_tool_calls`, tool turns in `messages`) is declared here and
planned by `tool_calls.ToolPlan`; the deprecated `functions`/`function_call` are refused by name.

Responses mirror OpenAI's shapes field for field. Streamed chunks are not built as models:
`ChatChunkEncoder` and `CompletionChunkEncoder` write the same bytes from a prefix and suffix
fixed per stream, JSON-escaping only what changes per chunk (a model per chunk cost ~10 us of
the frontend's per-token CPU); tests/test_frontend_stream.py holds them equal to the models.
"""

from __future__ import annotations

import json
import re
from typing import Any, ClassVar, Literal

import msgspec
from pydantic import (BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_serializer,
                      model_validator)

from tidal.config import (
    MAX_ABS_LOGIT_BIAS,
    MAX_ABS_PENALTY,
    MAX_N,
    MAX_PRIORITY,
    MAX_REPETITION_PENALTY,
    MIN_REPETITION_PENALTY,
)
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
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
"""What OpenAI allows as a function name; the tool prompt and the grammar rely on it too."""
MAX_LOGIT_BIAS_ENTRIES = 1024
"""Tokens one request's `logit_bias` may name (the engine applies them every step)."""
NO_OP_VALUES: dict[str, tuple[Any, ...]] = {
    "store": (False,),  # Tidal stores no completions
    "service_tier": ("auto", "default"),
    "modalities": (["text"],),  # text out only
    "metadata": ({},),  # kept only with stored completions
    "suffix": ("",),  # no fill-in-the-middle
    "include_obfuscation": (False,),  # stream_options: no obfuscation padding
    "prompt_cache_retention": ("in_memory",),  # the prefix cache lives in the workers' memory
    "audio": (), "prediction": (), "moderation": (), "safety_identifier": (), "verbosity": (),
    "web_search_options": (), "prompt_cache_options": (),
}
"""OpenAI request fields Tidal declares but does not implement: each is accepted as null or at one of
these values, the ones that ask nothing of the server; anything else is a 400 naming the field."""


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class RequestModel(OpenAIBaseModel):
    """A request body (or a part of one): a field it does not declare is a 400 naming that field."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class FieldValueError(ValueError):
    """A model validator's refusal that names the field it is about (the 400's `param`), where a plain
    ValueError from a model validator names none."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def no_op_only(value: Any, info: ValidationInfo) -> Any:
    """A validator for the fields of `NO_OP_VALUES`: null or a value that asks for nothing."""
    allowed = NO_OP_VALUES[info.field_name]
    if value is not None and value not in allowed:
        accepted = " or ".join(["null", *(repr(v) for v in allowed)])
        raise ValueError(f"{info.field_name}={value!r} is not supported by this server (it accepts {accepted})")
    return value


# ---------------------------------------------------------------------------------------------
# requests


class StreamOptions(RequestModel):
    include_usage: bool | None = False
    include_obfuscation: Any = None

    _no_ops = field_validator("include_obfuscation")(no_op_only)


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


class MessageFunctionCall(OpenAIBaseModel):
    name: str
    arguments: str
    """A JSON text, as OpenAI sends it; the chat template gets it parsed (`ChatMessage.template_dict`)."""


class MessageToolCall(OpenAIBaseModel):
    """A call an earlier assistant turn made (`messages[i].tool_calls`)."""

    id: str
    type: Literal["function"] = "function"
    function: MessageFunctionCall


class ChatMessage(BaseModel):
    """A chat message. Extra keys go to the chat template as they came."""

    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None
    """The call a `tool` message answers."""
    reasoning_content: str | None = None
    """An assistant turn's reasoning, sent back by clients; templates that show it read it."""

    @model_validator(mode="after")
    def _tool_turns(self) -> ChatMessage:
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a message with role 'tool' needs the 'tool_call_id' of the call it answers")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry 'tool_calls'")
        return self

    def template_dict(self) -> dict[str, Any]:
        """The message as the chat template sees it: content flattened to one string, each tool
        call's arguments parsed into an object (templates write them with `tojson`; text that is no
        JSON object stays text)."""
        message = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            message["content"] = "\n".join(part.text or "" for part in self.content)
        elif self.content is None:
            message["content"] = ""
        for call in message.get("tool_calls", ()):
            function = call["function"]
            try:
                arguments = json.loads(function["arguments"])
            except ValueError:
                continue
            if isinstance(arguments, dict):
                function["arguments"] = arguments
        return message


class FunctionDefinition(RequestModel):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    """A JSON schema of the arguments object; None: the function takes none."""
    strict: bool | None = None
    """True: the arguments must match `parameters`. Honoured where a grammar constrains the output
    (`tool_choice` "required" or a named function); refused with "auto" (`ToolPlan`)."""

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not TOOL_NAME.fullmatch(name):
            raise ValueError("a function name is 1 to 64 letters, digits, '_' or '-'")
        return name

    @field_validator("parameters")
    @classmethod
    def _object_schema(cls, schema: dict[str, Any] | None) -> dict[str, Any] | None:
        if schema is None:
            return None
        if schema.get("type", "object") != "object":
            raise ValueError(f"parameters must be a JSON schema of type 'object', got type {schema['type']!r}")
        if not isinstance(schema.get("properties", {}), dict):
            raise ValueError("parameters.properties must be an object of JSON schemas")  # noqa: TRY004 - pydantic
        required = schema.get("required", [])
        if not isinstance(required, list) or not all(isinstance(name, str) for name in required):
            raise ValueError("parameters.required must be a list of property names")
        return schema


class ToolDefinition(RequestModel):
    type: Literal["function"]
    function: FunctionDefinition


class ToolChoiceFunction(RequestModel):
    name: str


class NamedToolChoice(RequestModel):
    """`tool_choice` naming one function: the model must call it."""

    type: Literal["function"]
    function: ToolChoiceFunction


ReasoningEffort = Literal["none", "minimal", "low", "medium", "high"]


class RoutingOptions(RequestModel):
    """Tidal extension: per-request weights of the kv routing policy."""

    overlap_weight: float | None = Field(default=None, ge=0.0, le=MAX_OVERLAP_WEIGHT)
    temperature: float | None = Field(default=None, ge=0.0, le=MAX_KV_TEMPERATURE)


class SamplingRequest(RequestModel, StructuredFields):
    """Fields shared by chat and text completions (the structured-output ones: `StructuredFields`)."""

    model: str
    n: int | None = Field(default=None, ge=1, le=MAX_N)  # None: 1; above the server's `max_n`: 400 there
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
    presence_penalty: float | None = Field(default=None, ge=-MAX_ABS_PENALTY, le=MAX_ABS_PENALTY)
    frequency_penalty: float | None = Field(default=None, ge=-MAX_ABS_PENALTY, le=MAX_ABS_PENALTY)
    repetition_penalty: float | None = Field(default=None, ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY)
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias; ids checked in check_request
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # also the routing session when no x-session-id header (or prompt_cache_key) is sent
    prompt_cache_key: str | None = None  # the routing session (before `user`): where this prefix is cached
    priority: int = Field(default=0, ge=-MAX_PRIORITY, le=MAX_PRIORITY)  # admission order when the router queues
    routing: RoutingOptions | None = None

    @field_validator("logit_bias")
    @classmethod
    def _token_biases(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        if bias is None:
            return None
        if len(bias) > MAX_LOGIT_BIAS_ENTRIES:
            raise ValueError(f"at most {MAX_LOGIT_BIAS_ENTRIES} tokens may be biased, got {len(bias)}")
        for key, value in bias.items():
            if not (key.isascii() and key.isdigit() and str(int(key)) == key and int(key) <= INT32_MAX):
                raise ValueError(f"keys must be token ids (integers written as strings), got {key!r}")
            if not -MAX_ABS_LOGIT_BIAS <= value <= MAX_ABS_LOGIT_BIAS:
                raise ValueError(f"values must lie in [-{MAX_ABS_LOGIT_BIAS:g}, {MAX_ABS_LOGIT_BIAS:g}], "
                                 f"got {value} for token {key}")
        return bias

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> SamplingRequest:
        if self.stream_options is not None and not self.stream:
            raise FieldValueError("stream_options", "stream_options is only allowed when stream is true")
        return self

    @property
    def num_choices(self) -> int:
        return 1 if self.n is None else self.n

    def logit_bias_pairs(self) -> tuple[tuple[int, float], ...]:
        """`logit_bias` as SamplingParams takes it: (token id, bias), by id."""
        return tuple(sorted((int(k), v) for k, v in (self.logit_bias or {}).items()))

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
        return self.stream_options is not None and bool(self.stream_options.include_usage)


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    """None: "auto" when there are tools, "none" otherwise (as OpenAI)."""
    parallel_tool_calls: bool = True
    """False: at most one call per reply."""
    reasoning_effort: ReasoningEffort | None = None
    """Honoured where the chat template reads it; a 400 elsewhere (`ToolPlan` checks)."""
    functions: Any = None
    function_call: Any = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    # OpenAI's fields that ask nothing of Tidal at their no-op value (NO_OP_VALUES); 400 at any other
    store: Any = None
    service_tier: Any = None
    modalities: Any = None
    metadata: Any = None
    prompt_cache_retention: Any = None
    prompt_cache_options: Any = None
    audio: Any = None
    prediction: Any = None
    moderation: Any = None
    safety_identifier: Any = None
    verbosity: Any = None
    web_search_options: Any = None

    _no_ops = field_validator("store", "service_tier", "modalities", "metadata", "prompt_cache_retention",
                              "prompt_cache_options", "audio", "prediction", "moderation", "safety_identifier",
                              "verbosity", "web_search_options")(no_op_only)

    @field_validator("functions", "function_call")
    @classmethod
    def _deprecated(cls, value: Any, info) -> Any:
        if value is not None:
            raise ValueError(f"{info.field_name} is deprecated and not supported; send 'tools' and "
                             "'tool_choice' instead")
        return value

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
            raise FieldValueError("top_logprobs", "top_logprobs requires logprobs to be true")
        return self

    def tool_dicts(self) -> list[dict[str, Any]] | None:
        """The tools as the chat template gets them (plain JSON values)."""
        if not self.tools:
            return None
        return [tool.model_dump(exclude_none=True) for tool in self.tools]

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
    echo: bool | None = False  # the prompt's text before each choice's output
    best_of: int | None = Field(default=None, ge=1, le=MAX_N)  # samples to pick the n most likely from
    suffix: Any = None  # no-op only (NO_OP_VALUES)

    _no_ops = field_validator("suffix")(no_op_only)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: Prompt) -> Prompt:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ValueError("only one prompt per request is supported")
        if isinstance(prompt, list) and not prompt:
            raise ValueError("prompt must not be empty")
        return prompt

    @model_validator(mode="after")
    def _best_of_covers_n(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of < self.num_choices:
            raise FieldValueError("best_of", f"best_of ({self.best_of}) must be at least n ({self.num_choices})")
        if self.best_of is not None and self.best_of > 1 and self.stream:
            raise FieldValueError("best_of", "best_of can't be used with stream (the best choices are known only "
                                  "at the end)")
        if self.echo and self.logprobs is not None:
            raise FieldValueError("echo", "echo with logprobs (the prompt's logprobs) is not supported; echo "
                                  "without logprobs, or logprobs without echo, are")
        return self

    @property
    def num_samples(self) -> int:
        """Samples to generate: `best_of` of them when given (the `n` most likely are returned), else n."""
        return self.num_choices if self.best_of is None else self.best_of

    def text_or_token_ids(self) -> str | list[int]:
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        return prompt  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# responses


class OmitNoneModel(OpenAIBaseModel):
    """A response model whose fields named in `OMIT_IF_NONE` are left out of its JSON while None:
    fields a feature added stay out of the responses of requests that don't use it."""

    OMIT_IF_NONE: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _omit_none(self, handler):
        data = handler(self)
        for name in self.OMIT_IF_NONE:
            if data.get(name, 0) is None:
                del data[name]
        return data


class PromptTokensDetails(OpenAIBaseModel):
    cached_tokens: int = 0


class CompletionTokensDetails(OpenAIBaseModel):
    reasoning_tokens: int = 0


class UsageInfo(OmitNoneModel):
    OMIT_IF_NONE: ClassVar[tuple[str, ...]] = ("completion_tokens_details",)

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None
    completion_tokens_details: CompletionTokensDetails | None = None
    """Set where a reasoning parser runs: how many output tokens were reasoning."""


class ChatTopLogprob(OpenAIBaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(OpenAIBaseModel):
    content: list[ChatTokenLogprob] | None = None


class FunctionCall(OpenAIBaseModel):
    name: str
    arguments: str
    """The arguments object as JSON text."""


class ToolCall(OpenAIBaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatResponseMessage(OmitNoneModel):
    OMIT_IF_NONE: ClassVar[tuple[str, ...]] = ("reasoning_content", "tool_calls")

    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None


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
    delta: dict[str, Any]  # role, content, reasoning_content, tool_calls (see ChatChunkEncoder.delta_chunk)
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
    """One chat stream's chunks of choice `index` as SSE events: the bytes of `ChatCompletionChunk`
    with that one choice, `model_dump_json(exclude={"usage"})` unless `include_usage`."""

    def __init__(self, request_id: str, created: int, model: str, include_usage: bool, index: int = 0) -> None:
        self._prefix = (b'data: {"id":' + _json(request_id) + b',"object":"chat.completion.chunk","created":'
                        + _json(created) + b',"model":' + _json(model) + b',"choices":[{"index":' + _json(index)
                        + b',"delta":')
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

    def delta_chunk(self, delta: dict[str, Any], *, logprobs: ChatChoiceLogprobs | None = None,
                    finish_reason: str | None = None) -> bytes:
        """A chunk whose delta is more than content (`reasoning_content`, `tool_calls`): the dict is
        written as it is, in its order. Streams with a tool or reasoning parser only; the plain
        content path stays `chunk`."""
        return b"".join((self._prefix, _json(delta), b',"logprobs":', _logprobs_json(logprobs), b',"finish_reason":',
                         _json(finish_reason), self._suffix))


class CompletionChunkEncoder:
    """One text-completion stream's chunks of choice `index` as SSE events: the bytes of
    `CompletionResponse` with that one choice, `model_dump_json(exclude={"usage"})` unless `include_usage`."""

    def __init__(self, request_id: str, created: int, model: str, include_usage: bool, index: int = 0) -> None:
        self._prefix = (b'data: {"id":' + _json(request_id) + b',"object":"text_completion","created":'
                        + _json(created) + b',"model":' + _json(model) + b',"choices":[{"index":' + _json(index)
                        + b',"text":')
        self._suffix = _chunk_suffix(include_usage)

    def chunk(self, text: str, *, logprobs: CompletionLogprobs | None = None,
              finish_reason: str | None = None) -> bytes:
        return b"".join((self._prefix, _json(text), b',"logprobs":', _logprobs_json(logprobs),
                         b',"finish_reason":', _json(finish_reason), self._suffix))
