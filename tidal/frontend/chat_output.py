"""One chat choice's reply read as it streams: reasoning, content and tool calls apart.

`ChatOutputFormat` is what a request asks of its replies (a tool parser from `ToolPlan`, a
reasoning mode from the server's `reasoning_parser`); it is built once per request and makes a
`ChatOutputParser` per choice. The parser is fed each text step of its choice and returns the
deltas to stream (dicts in OpenAI's delta shape, without the role); `finish` flushes what was held
back and gives the choice's finish reason ("tool_calls" where the model stopped after calling);
`message` is the whole reply, the same pieces joined. The text goes through the reasoning parser
first, so tool calls are read from the answer only, never from the reasoning. A harmony reply
(gpt-oss) is read by one `HarmonyParser` in place of both: its channels hold all three.

Reasoning tokens are the output tokens of the steps that began inside the reasoning (the closing
`</think>` included); 0 where the reply had none.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tidal.frontend.harmony import HARMONY_MARKERS, HarmonyParser
from tidal.frontend.openai_types import ChatResponseMessage, FunctionCall, ToolCall
from tidal.frontend.reasoning import THINK_CLOSE, THINK_OPEN, ReasoningMode, ReasoningParser
from tidal.frontend.tool_parsers import ToolCallDelta, ToolCallParser


@dataclass(frozen=True)
class ChatOutputFormat:
    tools: Callable[[], ToolCallParser] | None = None
    """Makes a reply's tool-call parser; None: tool calls are not parsed."""
    reasoning: ReasoningMode | None = None
    in_reasoning: bool = False
    """Replies begin inside their reasoning (the prompt opened it)."""
    tool_markers: tuple[str, ...] = ()
    harmony: Callable[[], HarmonyParser] | None = None
    """Makes a reply's harmony parser (gpt-oss), which reads what `tools` and `reasoning` would."""

    @property
    def parses(self) -> bool:
        return self.tools is not None or self.reasoning is not None or self.harmony is not None

    @property
    def markers(self) -> tuple[str, ...]:
        """Tags the parsers read, which must stay in the text even where they are special tokens."""
        return (self.tool_markers + ((THINK_OPEN, THINK_CLOSE) if self.reasoning else ())
                + (HARMONY_MARKERS if self.harmony else ()))

    def parser(self) -> ChatOutputParser:
        return ChatOutputParser(self.tools() if self.tools else None,
                                ReasoningParser(self.in_reasoning) if self.reasoning else None,
                                self.harmony() if self.harmony else None)


class ChatOutputParser:
    def __init__(self, tools: ToolCallParser | None, reasoning: ReasoningParser | None,
                 harmony: HarmonyParser | None = None) -> None:
        self._tools = tools
        self._reasoning = reasoning
        self._harmony = harmony
        self._content: list[str] = []
        self._reasoning_parts: list[str] = []
        self._calls: dict[int, list[str]] = {}  # index -> [id, name, arguments]
        self._reasoning_tokens = 0

    def feed(self, text: str, num_tokens: int) -> list[dict[str, Any]]:
        if self._harmony is not None:
            self._reasoning_tokens += num_tokens if self._harmony.in_reasoning else 0
            reasoning, parsed = self._harmony.feed(text)
            return self._record(reasoning, parsed.content, parsed.calls)
        reasoning = ""
        content = text
        if self._reasoning is not None:
            if self._reasoning.in_reasoning:
                self._reasoning_tokens += num_tokens
            reasoning, content = self._reasoning.feed(text)
        calls: list[ToolCallDelta] = []
        if self._tools is not None and content:
            parsed = self._tools.feed(content)
            content, calls = parsed.content, parsed.calls
        return self._record(reasoning, content, calls)

    def finish(self, finish_reason: str | None) -> tuple[list[dict[str, Any]], str | None]:
        """The deltas held back till the end, and the choice's finish reason."""
        reasoning, content = self._reasoning.finish() if self._reasoning is not None else ("", "")
        calls: list[ToolCallDelta] = []
        if self._harmony is not None:
            reasoning, parsed = self._harmony.finish()
            content, calls = parsed.content, parsed.calls
        elif self._tools is not None:
            parsed = self._tools.feed(content) if content else None
            end = self._tools.finish()
            content = (parsed.content if parsed else "") + end.content
            calls = (parsed.calls if parsed else []) + end.calls
        deltas = self._record(reasoning, content, calls)
        if self._calls and finish_reason == "stop":
            finish_reason = "tool_calls"
        return deltas, finish_reason

    @property
    def reasoning_tokens(self) -> int | None:
        """None where no reasoning parser runs."""
        reader = self._harmony or self._reasoning
        if reader is None:
            return None
        return self._reasoning_tokens if reader.had_reasoning else 0

    def message(self) -> ChatResponseMessage:
        content: str | None = "".join(self._content)
        tool_calls = None
        if self._calls:
            tool_calls = [ToolCall(id=call_id, function=FunctionCall(name=name, arguments=arguments))
                          for call_id, name, arguments in self._calls.values()]
            content = content if content.strip() else None
        reasoning = "".join(self._reasoning_parts)
        return ChatResponseMessage(content=content, reasoning_content=reasoning or None, tool_calls=tool_calls)

    def _record(self, reasoning: str, content: str, calls: list[ToolCallDelta]) -> list[dict[str, Any]]:
        """Keeps the pieces for `message`, and groups them into deltas: reasoning and content first,
        then each call's first delta on its own, then its argument pieces merged."""
        deltas: list[dict[str, Any]] = []
        head: dict[str, Any] = {}
        if reasoning:
            self._reasoning_parts.append(reasoning)
            head["reasoning_content"] = reasoning
        if content:
            self._content.append(content)
            head["content"] = content
        if head:
            deltas.append(head)
        last: ToolCallDelta | None = None
        for call in calls:
            if call.id is not None:
                self._calls[call.index] = [call.id, call.name, ""]
            self._calls[call.index][2] += call.arguments
            if call.id is None and last is not None and last.id is None and last.index == call.index:
                last.arguments += call.arguments
                deltas[-1] = {"tool_calls": [last.as_json()]}
                continue
            last = ToolCallDelta(call.index, call.id, call.name, call.arguments)
            deltas.append({"tool_calls": [last.as_json()]})
        return deltas
