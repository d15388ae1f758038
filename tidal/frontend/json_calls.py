"""Tool calls read out of JSON as it streams: `{"name": ..., "arguments": {...}}` a piece at a time.

Every tool-call format Tidal parses carries each call as such a JSON object (inside <tool_call>
tags, bare after Llama 3's <|python_tag|>, as the items of the array a grammar forced). `CallReader`
reads one object from text fed in pieces: once the name and the first character of the arguments
are in, it reports the call's name, then hands out the arguments' text as it arrives, so a client
sees the call's arguments stream. The arguments are the model's own text, not re-serialized, so the
pieces add up to exactly what a non-streaming reply returns. `JsonEnd` tracks only nesting and
strings, which is enough to know where a value ends and to notice text that is no JSON at all.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

_JSON_OUTSIDE_STRINGS = frozenset(' \t\r\n{}[],:-+.0123456789eEtrufalsn')
"""Characters JSON can have outside strings; any other one means the text is not JSON."""
_CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')
_STRING_RUN = re.compile(r'[^"\\]+')


class JsonEnd:
    """Where one JSON value (object, array or string) ends, fed a piece at a time.

    `feed` returns how much of the text belongs to the value: all of it while the value goes on, up
    to its last character once it ends (`done`). `failed` is set at a character that can't be JSON
    outside a string (`<` of a closing tag, a letter of prose) or a bracket closing nothing."""

    __slots__ = ("depth", "done", "escape", "failed", "in_string")

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = self.escape = self.done = self.failed = False

    def feed(self, text: str) -> int:
        i, n = 0, len(text)
        while i < n and not (self.done or self.failed):
            ch = text[i]
            if self.in_string:
                if self.escape:
                    self.escape = False
                elif ch == "\\":
                    self.escape = True
                elif ch == '"':
                    self.in_string = False
                    self.done = self.depth == 0
                else:
                    run = _STRING_RUN.match(text, i)  # skip plain string text at once
                    i = run.end() if run else i + 1
                    continue
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                self.failed = self.depth < 0
                self.done = self.depth == 0
            elif ch not in _JSON_OUTSIDE_STRINGS:
                self.failed = True
                return i
            i += 1
        return i


@dataclass(slots=True)
class CallPiece:
    """What one `CallReader.feed` learned: the call's name (the first time only), arguments text."""

    name: str | None = None
    arguments: str = ""


class CallReader:
    """One tool-call object, read as it streams.

    Lifecycle: `feed` text until `done` (the object closed) or `failed` (the text is not JSON);
    `feed` returns how many characters it consumed, stopping at the object's end, and what it
    learned. `named` (set on a call whose name is known: the grammar forced its arguments) means
    the text is the arguments object alone. A call is `started` once its name has been handed out;
    a reader that ends unstarted found no call (the caller shows the text as content)."""

    def __init__(self, name: str | None = None) -> None:
        self._named = name
        self.text = ""  # the object's text so far
        self._whole = JsonEnd()
        self._arguments: JsonEnd | None = None
        self._arguments_from = 0  # where the streamed arguments start in `text`
        self._sent = 0  # how far into `text` the arguments were handed out
        self.started = False

    @property
    def done(self) -> bool:
        return self._whole.done

    @property
    def failed(self) -> bool:
        return self._whole.failed

    def feed(self, text: str) -> tuple[int, CallPiece]:
        used = self._whole.feed(text)
        self.text += text[:used]
        piece = CallPiece()
        if not self.started:
            self._start(piece)
        if self._arguments is not None and self._sent < len(self.text):
            fresh = self.text[self._sent:]
            end = self._sent + self._arguments.feed(fresh) if not self._arguments.done else self._sent
            piece.arguments = self.text[self._sent:end]
            self._sent = end
        if self.done and not self.started:
            self._whole_call(piece)
        elif self.done and self._arguments is None and self.started:
            piece.arguments = _arguments_text(self.text, self._named)  # arguments that were not an object
        return used, piece

    def _start(self, piece: CallPiece) -> None:
        """Hands out the name once the arguments' first character is in, if the object begins
        `{"name": ..., "arguments": ` (the order models and grammars write)."""
        if self._named is not None:
            stripped = self.text.lstrip()
            if not stripped:
                return
            if stripped[0] != "{":
                self._whole.failed = True  # arguments are an object
                return
            start, name = len(self.text) - len(stripped), self._named
        else:
            head = _CALL_HEAD.match(self.text)
            if head is None or head.end() >= len(self.text):
                return
            try:
                name = json.loads(f'"{head.group(1)}"')
            except ValueError:
                return
            start = head.end()
        self.started, piece.name = True, name
        if self.text[start] == "{":
            self._arguments, self._arguments_from, self._sent = JsonEnd(), start, start

    def _whole_call(self, piece: CallPiece) -> None:
        """An object that ended before its name was handed out (keys in another order): a call if
        it parses as one."""
        try:
            value = json.loads(self.text)
        except ValueError:
            return
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            return
        arguments = value.get("arguments", value.get("parameters", {}))
        self.started, piece.name = True, value["name"]
        piece.arguments = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)

    def finish(self) -> CallPiece:
        """The text ended (a length cut): a started call keeps the arguments it has; the rest of
        them, if some were held (not an object), as they are."""
        piece = CallPiece()
        if self.started and self._arguments is None and not self.done:
            piece.arguments = _arguments_text(self.text, self._named)
        return piece


def _arguments_text(text: str, named: str | None) -> str:
    """The arguments of a call whose arguments value is not an object (a string holding JSON, as
    some models write): decoded to the JSON text it holds."""
    try:
        value = json.loads(text)
    except ValueError:
        return ""
    if named is None:
        value = value.get("arguments", value.get("parameters", {})) if isinstance(value, dict) else {}
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
