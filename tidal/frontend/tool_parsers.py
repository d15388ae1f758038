"""Tool calls parsed out of a model's streamed text, per output format.

A parser is fed the reply's text a step at a time and returns `ParsedText`: the content that is
certain to be content, and `ToolCallDelta`s as OpenAI streams them (a call's first delta carries its
index, id and name with empty arguments; later ones carry pieces of the arguments). Text that may
still turn into a call (a partial `<tool_call>` tag, an object whose name is not in yet) is held
back until it is decided; whitespace next to a call is formatting and is dropped. A non-streaming
reply feeds the same parser the same steps, so both agree. Formats:

- `HermesToolParser`: calls as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` among
  the content (Qwen 2.5/3, Hermes, and Tidal's own tool prompt); a block that is not a call stays
  content, verbatim.
- `JsonCallsParser`: a reply that is nothing but calls: Llama 3.x's `{"name": ..., "parameters":
  {...}}` (after an optional `<|python_tag|>`, several separated by `;`), and the JSON array a
  grammar forces for `tool_choice: "required"`. A reply that does not open with a call is content.
- `NamedCallParser`: `tool_choice` naming a function: the reply is that call's arguments object.

`max_calls` 1 (`parallel_tool_calls: false`) keeps the first call and drops the others.
Lifecycle: `feed` any number of times, then `finish` once.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from tidal.frontend.json_calls import CallPiece, CallReader


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(slots=True)
class ToolCallDelta:
    """One piece of one call: its first (`id` and `name` set, `arguments` "") or a later one."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def as_json(self) -> dict[str, Any]:
        if self.id is None:
            return {"index": self.index, "function": {"arguments": self.arguments}}
        return {"index": self.index, "id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(slots=True)
class ParsedText:
    content: str = ""
    calls: list[ToolCallDelta] = field(default_factory=list)


def partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of `text` that begins `tag` (and so may become it)."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0


class ToolCallParser:
    """What every format shares: the output being built, content with its trailing whitespace held
    (whitespace before a call is dropped), and the current call's reader."""

    def __init__(self, max_calls: int | None = None) -> None:
        self.max_calls = max_calls
        self.num_calls = 0
        self._out = ParsedText()
        self._held_space = ""
        self._pending = ""
        self._reader: CallReader | None = None
        self._call_kept = False
        self._space_before_call = ""

    def feed(self, text: str) -> ParsedText:
        self._pending += text
        self._advance()
        return self._take()

    def finish(self) -> ParsedText:
        self._finish()
        if self.num_calls == 0:
            self._out.content += self._held_space
        self._held_space = ""
        return self._take()

    def _advance(self) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        raise NotImplementedError

    def _take(self) -> ParsedText:
        out, self._out = self._out, ParsedText()
        return out

    def _content(self, text: str) -> None:
        text = self._held_space + text
        kept = text.rstrip()
        self._held_space = text[len(kept):]
        self._out.content += kept

    def _open_call(self, name: str | None = None) -> None:
        self._space_before_call, self._held_space = self._held_space, ""
        self._reader = CallReader(name)
        self._call_kept = False

    def _not_a_call(self, text: str) -> None:
        """What looked like a call's beginning was not: its text is content, and so is the
        whitespace before it."""
        self._held_space = self._space_before_call
        self._content(text)

    def _read_call(self) -> CallReader:
        """Feeds the pending text to the open call; what it consumed leaves `_pending`."""
        reader = self._reader
        used, piece = reader.feed(self._pending)
        self._pending = self._pending[used:]
        self._emit(piece)
        return reader

    def _emit(self, piece: CallPiece) -> None:
        if piece.name is not None:
            self._call_kept = self.max_calls is None or self.num_calls < self.max_calls
            if self._call_kept:
                self._out.calls.append(ToolCallDelta(self.num_calls, new_call_id(), piece.name))
                self.num_calls += 1
        if piece.arguments and self._call_kept:
            self._out.calls.append(ToolCallDelta(self.num_calls - 1, arguments=piece.arguments))


class HermesToolParser(ToolCallParser):
    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def __init__(self, max_calls: int | None = None) -> None:
        super().__init__(max_calls)
        self._state = "text"  # text | call | after (the call read, its closing tag to skip)

    def _advance(self) -> None:
        while self._pending:
            if self._state == "text":
                at = self._pending.find(self.OPEN)
                if at < 0:
                    keep = partial_suffix(self._pending, self.OPEN)
                    self._content(self._pending[:len(self._pending) - keep])
                    self._pending = self._pending[len(self._pending) - keep:]
                    return
                self._content(self._pending[:at])
                self._pending = self._pending[at + len(self.OPEN):]
                self._open_call()
                self._state = "call"
            elif self._state == "call":
                reader = self._read_call()
                if (reader.failed or reader.done) and not reader.started:
                    self._not_a_call(self.OPEN + reader.text)
                    self._state = "text"
                elif reader.failed or reader.done:
                    self._state = "after"
                else:
                    return
            else:
                self._skip_to_close()
                if self._state == "after":
                    return

    def _skip_to_close(self) -> None:
        """After a call: drop text up to its closing tag (or to the next call's opening tag, where
        a model leaves the closing one out)."""
        close, opening = self._pending.find(self.CLOSE), self._pending.find(self.OPEN)
        if opening >= 0 and (close < 0 or opening < close):
            self._pending, self._state = self._pending[opening:], "text"
        elif close >= 0:
            self._pending, self._state = self._pending[close + len(self.CLOSE):], "text"
        else:
            keep = max(partial_suffix(self._pending, self.CLOSE), partial_suffix(self._pending, self.OPEN))
            self._pending = self._pending[len(self._pending) - keep:]

    def _finish(self) -> None:
        if self._state == "text":
            self._content(self._pending)
        elif self._state == "call" and self._reader.started:
            self._emit(self._reader.finish())
        elif self._state == "call":
            self._not_a_call(self.OPEN + self._reader.text + self._pending)
        self._pending = ""


class JsonCallsParser(ToolCallParser):
    """Replies made of calls alone: `<|python_tag|>`? `{call}` (`;` `{call}`)* or `[{call}, ...]`.
    Decided at the first character that is not whitespace: a reply that opens with anything else is
    content throughout, as is one whose first object is no call."""

    TAG = "<|python_tag|>"
    _SKIPPED = " \t\r\n;,["  # between calls

    def __init__(self, max_calls: int | None = None) -> None:
        super().__init__(max_calls)
        self._state = "between"  # between | call | content | end
        self._seen = ""  # all text so far while no call has started (shown as content if none comes)

    def feed(self, text: str) -> ParsedText:
        if self.num_calls == 0 and self._state != "content":
            self._seen += text
        return super().feed(text)

    def _advance(self) -> None:
        while self._pending:
            if self._state == "content":
                self._content(self._pending)
                self._pending = ""
            elif self._state == "end":
                self._pending = ""
            elif self._state == "between":
                rest = self._pending.lstrip(self._SKIPPED)
                if rest.startswith(self.TAG):
                    self._pending = rest[len(self.TAG):]
                elif not rest or self.TAG.startswith(rest):
                    return  # whitespace, or maybe the tag: wait
                elif rest[0] == "{":
                    self._pending = rest
                    self._open_call()
                    self._state = "call"
                else:
                    self._pending = rest
                    self._not_calls("]" if rest[0] == "]" else None)
            else:
                reader = self._read_call()
                if (reader.failed or reader.done) and not reader.started:
                    self._not_calls(None)
                elif reader.failed:
                    self._state = "content"
                elif reader.done:
                    self._state = "between"
                else:
                    return

    def _not_calls(self, closing: str | None) -> None:
        """Text that is no call: the whole reply is content if no call came before it; after calls,
        an array's `]` ends them and anything else is content."""
        if self.num_calls == 0:
            self._content(self._seen)
            self._pending, self._state = "", "content"
        else:
            self._state = "end" if closing else "content"

    def _finish(self) -> None:
        if self._state == "call" and self._reader.started:
            self._emit(self._reader.finish())
        elif self.num_calls == 0 and self._state != "content":
            self._content(self._seen)
        self._pending = ""


class NamedCallParser(ToolCallParser):
    """The reply is the arguments object of the one function `tool_choice` named (a grammar forced
    it); text after the object is dropped. A reply that is no JSON at all is content."""

    def __init__(self, name: str) -> None:
        super().__init__(1)
        self._open_call(name)
        self._as_content = False

    def _advance(self) -> None:
        reader = self._reader
        if self._as_content:
            self._content(self._pending)
        elif not (reader.done or reader.failed):
            self._read_call()
            if reader.failed and not reader.started:
                self._as_content = True
                self._not_a_call(reader.text + self._pending)
        self._pending = ""

    def _finish(self) -> None:
        if self._reader.started:
            self._emit(self._reader.finish())
