"""What a chat request's tools mean for its prompt, its sampling and its reply: `ToolPlan`.

Built once per request from the request (`tools`, `tool_choice`, `parallel_tool_calls`), the chat
template's features and the server's `tool_call_parser` setting; it refuses what can't be honoured
with a 400 naming the field, and is read-only afterwards.

- Prompt. The template gets `tools` (and every choice, "none" included, renders them, as OpenAI
  does). A template that does not read `tools` would drop them silently, so the plan writes them
  into a system prompt itself (`TOOL_PROMPT`: the definitions as JSON inside <tools></tools> and the
  instruction to answer with <tool_call>{"name": ..., "arguments": {...}}</tool_call>, the Hermes
  format, which `HermesToolParser` reads). A template that does not read `tool_calls` gets earlier
  calls as that same text in the assistant turn, and tool results as a user turn of
  <tool_response> blocks.
- Sampling. "required" and a named function are enforced by a grammar
  (`SamplingParams.structured`): "required" makes the reply a JSON array of {"name": one of the
  tools, "parameters": its arguments}, at least one item (at most one without parallel calls); a
  named function makes it that function's arguments object. "auto" and "none" leave it free.
- Reply. "auto" parses calls in the model's own format (`tool_call_parser`: `hermes`,
  `llama3_json`, or `auto`: the format the template writes); the forced choices read their JSON
  directly; "none" parses nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from tidal.frontend.chat_template_features import TemplateFeatures
from tidal.frontend.errors import bad_request
from tidal.frontend.openai_types import ChatCompletionRequest, NamedToolChoice
from tidal.frontend.tool_parsers import HermesToolParser, JsonCallsParser, NamedCallParser, ToolCallParser
from tidal.protocol import SamplingParams, StructuredOutput

TOOL_PROMPT = """# Tools

These functions are available to you, each described by a JSON object on its own line between <tools> and </tools>:
<tools>
{tools}
</tools>

{instruction}"""
CALL_INSTRUCTION = """To call one, answer with a JSON object that holds the function's name and its arguments, \
between <tool_call> and </tool_call>; use one such block per call:
<tool_call>
{"name": "the_function", "arguments": {"an_argument": "its value"}}
</tool_call>
What a call returns comes back to you in <tool_response></tool_response>."""
NO_CALL_INSTRUCTION = "Do not call any of them in this reply: answer in plain text."
EMPTY_PARAMETERS = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class ToolPlan:
    tools: list[dict[str, Any]] | None
    """The definitions as the chat template gets them."""
    choice: str
    """none | auto | required | function (the one named by `function`)."""
    function: str | None
    parallel: bool
    features: TemplateFeatures
    parser_name: str
    """The format "auto" parses: hermes | llama3_json."""

    @classmethod
    def for_request(cls, req: ChatCompletionRequest, features: TemplateFeatures, parser_setting: str) -> ToolPlan:
        """The plan of `req`; raises a 400 (`OpenAIError`) for what it can't honour."""
        tools = req.tools or []
        names = [tool.function.name for tool in tools]
        if len(set(names)) != len(names):
            raise bad_request("tools: two tools have the same name", param="tools")
        choice, function = _choice(req.tool_choice, bool(tools), names)
        if choice == "auto" and any(tool.function.strict for tool in tools):
            raise bad_request("strict function calling is enforced with tool_choice 'required' or a named "
                              "function; with 'auto' the model may answer in free text", param="tools")
        parser_name = features.tool_call_format if parser_setting == "auto" else parser_setting
        return cls(tools=req.tool_dicts(), choice=choice, function=function, parallel=req.parallel_tool_calls,
                   features=features, parser_name=parser_name)

    def template_messages(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
                          ) -> list[dict[str, Any]]:
        """The messages the template renders: with the tool prompt and tool turns as text where the
        template would not show them (see the module docstring). `tools`: the definitions as the
        prompt shows them (special-token text masked)."""
        if not self.features.reads_tool_calls:
            messages = tool_turns_as_text(messages)
        if tools and not self.features.reads_tools:
            messages = with_tool_prompt(messages, tools, calls_allowed=self.choice != "none")
        return messages

    def sampling_params(self, params: SamplingParams) -> SamplingParams:
        """`params` with the grammar of a forced choice."""
        structured = self.structured_output()
        if structured is None:
            return params
        if params.structured is not None:
            raise bad_request("response_format can't be combined with tool_choice 'required' or a named "
                              "function (both constrain the reply)", param="tool_choice")
        return msgspec.structs.replace(params, structured=structured)

    def structured_output(self) -> StructuredOutput | None:
        """The grammar that enforces "required" or a named function; None for the others."""
        if self.choice == "required":
            calls = {"type": "array", "minItems": 1,
                     "items": {"anyOf": [_call_schema(tool["function"]) for tool in self.tools]}}
            if not self.parallel:
                calls["maxItems"] = 1
            return StructuredOutput(kind="json", spec=json.dumps(calls, ensure_ascii=False))
        if self.choice == "function":
            (tool,) = [t for t in self.tools if t["function"]["name"] == self.function]
            return StructuredOutput(kind="json", spec=json.dumps(_parameters(tool["function"]), ensure_ascii=False))
        return None

    def parser_factory(self) -> Callable[[], ToolCallParser] | None:
        """Makes the parser of one reply (one per choice); None: the reply is not parsed."""
        max_calls = None if self.parallel else 1
        if self.choice == "required":
            return lambda: JsonCallsParser(max_calls)
        if self.choice == "function":
            return lambda: NamedCallParser(self.function)
        if self.choice == "auto" and self.tools:
            kind = JsonCallsParser if self.parser_name == "llama3_json" else HermesToolParser
            return lambda: kind(max_calls)
        return None

    @property
    def markers(self) -> tuple[str, ...]:
        """Tags the reply's parser reads (they must stay in the text)."""
        if self.choice == "auto" and self.tools and self.parser_name == "hermes":
            return (HermesToolParser.OPEN, HermesToolParser.CLOSE)
        return ()


def _choice(tool_choice, have_tools: bool, names: list[str]) -> tuple[str, str | None]:
    if tool_choice is None:
        return ("auto" if have_tools else "none"), None
    if isinstance(tool_choice, NamedToolChoice):
        name = tool_choice.function.name
        if name not in names:
            raise bad_request(f"tool_choice names the function {name!r}, which is not among the tools",
                              param="tool_choice")
        return "function", name
    if tool_choice == "required" and not have_tools:
        raise bad_request("tool_choice 'required' needs tools", param="tool_choice")
    return tool_choice, None


def _call_schema(function: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object",
            "properties": {"name": {"type": "string", "enum": [function["name"]]},
                           "parameters": _parameters(function)},
            "required": ["name", "parameters"], "additionalProperties": False}


def _parameters(function: dict[str, Any]) -> dict[str, Any]:
    """The schema of a function's arguments: always an object (a schema may leave its type out)."""
    return {"type": "object", **(function.get("parameters") or EMPTY_PARAMETERS)}


def with_tool_prompt(messages: list[dict[str, Any]], tools: list[dict[str, Any]], *,
                     calls_allowed: bool) -> list[dict[str, Any]]:
    """The messages with `TOOL_PROMPT` after the system prompt (a system message of its own if
    there is none)."""
    prompt = TOOL_PROMPT.format(tools="\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools),
                                instruction=CALL_INSTRUCTION if calls_allowed else NO_CALL_INSTRUCTION)
    if messages and messages[0].get("role") == "system":
        system = messages[0].get("content") or ""
        return [{**messages[0], "content": f"{system}\n\n{prompt}" if system else prompt}, *messages[1:]]
    return [{"role": "system", "content": prompt}, *messages]


def tool_turns_as_text(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Assistant calls as <tool_call> blocks in their turn's content; each run of tool results as
    one user turn of <tool_response> blocks."""
    out: list[dict[str, Any]] = []
    after_result = False
    for message in messages:
        if message.get("role") == "tool":
            block = f"<tool_response>\n{message.get('content', '')}\n</tool_response>"
            if after_result:
                out[-1] = {**out[-1], "content": out[-1]["content"] + "\n" + block}
            else:
                out.append({"role": "user", "content": block})
            after_result = True
            continue
        after_result = False
        if message.get("tool_calls"):
            calls = "\n".join(_call_text(call) for call in message["tool_calls"])
            content = message.get("content") or ""
            turn = {k: v for k, v in message.items() if k != "tool_calls"}
            out.append({**turn, "content": f"{content}\n{calls}" if content else calls})
        else:
            out.append(message)
    return out


def _call_text(call: dict[str, Any]) -> str:
    function = call.get("function", {})
    body = {"name": function.get("name"), "arguments": function.get("arguments", {})}
    return f"<tool_call>\n{json.dumps(body, ensure_ascii=False)}\n</tool_call>"
