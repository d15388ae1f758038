"""gpt-oss's harmony format read out of a reply: analysis -> reasoning, final -> content, calls.

A harmony reply is a run of messages, each `[<|start|>ROLE] HEADER <|message|> BODY END`:
  <|channel|>analysis<|message|>The user wants the weather...<|end|>
  <|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>
  {"city": "Oslo"}<|call|>
or, ending in an answer, `<|start|>assistant<|channel|>final<|message|>It is sunny.<|return|>`. The
header names the channel (`analysis`, `commentary`, `final`) and may name a recipient (`to=NAME`,
before or after the channel): a message with a recipient is a tool call whose body is its
arguments (`functions.NAME` is the client's function NAME; a built-in tool keeps its whole name).
END is `<|end|>`, or `<|call|>` / `<|return|>`, which end the reply (they are stop tokens, so
usually absent from the text); a `<|start|>` or `<|channel|>` without an END also starts the next.

`HarmonyParser` is fed the reply's text a step at a time (special tokens kept in the text) and
returns what is certain: the reasoning (analysis bodies), content (final bodies and commentary
meant for the user) and tool-call deltas in OpenAI's streaming shape. A partial marker at the end
of the text is held until the next step decides it. With calls not allowed (no tools, or
`tool_choice: "none"`), a call's body is content; past `max_calls`, calls are dropped. A reply
that does not open with a header (JSON that `response_format` forced, a model off its format) is
content, streamed as it comes. Lifecycle: `feed` any number
of times, then `finish` once.

Rendering needs nothing here: the model folder's chat template writes harmony (the `openai-harmony`
package needs the o200k vocabulary file from the internet, so Tidal does not use it);
`harmony_messages` only hands the template earlier turns' reasoning under the name it reads.
"""

from __future__ import annotations

import re
from typing import Any

from tidal.frontend.tool_parsers import ParsedText, ToolCallDelta, new_call_id, partial_suffix

START, CHANNEL, MESSAGE, CONSTRAIN = "<|start|>", "<|channel|>", "<|message|>", "<|constrain|>"
END, CALL, RETURN, END_OF_TEXT = "<|end|>", "<|call|>", "<|return|>", "<|endoftext|>"
HARMONY_MARKERS = (START, CHANNEL, MESSAGE, CONSTRAIN, END, CALL, RETURN)
"""The special tokens the parser reads: decoding must keep them in the text."""
_ENDS = (END, CALL, RETURN, END_OF_TEXT)  # end a message (dropped)
_NEXT = (START, CHANNEL)  # begin the next message's header (kept for it)
_BODY_MARKERS = _ENDS + _NEXT
_CHANNEL_NAME = re.compile(re.escape(CHANNEL) + r"\s*([^\s<]+)")
_RECIPIENT = re.compile(r"\bto=([^\s<]+)")
MAX_HEADER_CHARS = 512
"""A header longer than this without a harmony marker is no header: the text is content."""
FUNCTIONS_PREFIX = "functions."


def is_harmony_template(template: str | None) -> bool:
    """Whether a chat template writes harmony (gpt-oss's own does, `<|channel|>` and all)."""
    return bool(template) and CHANNEL in template


def harmony_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages with each assistant turn's `reasoning_content` (what Tidal's replies return) as
    `thinking`, the key harmony templates read (they keep the analysis before a tool call). A turn
    with content keeps its content only: the templates refuse both on a tool-call turn."""
    out = []
    for message in messages:
        reasoning = message.get("reasoning_content")
        bare = not message.get("content") and "thinking" not in message
        if message.get("role") == "assistant" and bare and reasoning:
            message = {**message, "thinking": reasoning}
        out.append(message)
    return out


def reply_opening(prompt: str) -> str | None:
    """The header the prompt opened for the reply where it ends inside one message's body
    (`...<|start|>assistant<|channel|>final<|message|>`), else None: the reply opens its own."""
    if not prompt.endswith(MESSAGE):
        return None
    return prompt[prompt.rfind(START) + len(START):-len(MESSAGE)]


class HarmonyParser:
    def __init__(self, calls: bool = False, max_calls: int | None = None, opening: str | None = None) -> None:
        self._calls, self._max_calls = calls, max_calls
        self.num_calls = 0
        self._pending = ""
        self._header = ""
        self._kind: str | None = None  # None: reading a header | reasoning | content | call | dropped
        self._out: tuple[list[str], list[str], list[ToolCallDelta]] = ([], [], [])
        self.had_reasoning = False
        self._opened_any = False  # a message has begun: what follows is harmony, whatever it is
        if opening is not None:
            self._open(opening)

    @property
    def in_reasoning(self) -> bool:
        """The text fed next is (or continues) an analysis body."""
        return self._kind == "reasoning"

    def feed(self, text: str) -> tuple[str, ParsedText]:
        """(reasoning, content and call deltas) that `text` decided."""
        self._pending += text
        while self._pending and self._step():
            pass
        return self._take()

    def finish(self) -> tuple[str, ParsedText]:
        """What is still held: a partial marker is text after all; a header never closed by
        `<|message|>` is dropped, or is content if it holds no harmony marker (the model wrote none)."""
        pending, self._pending = self._pending, ""
        if self._kind is not None:
            self._emit(pending)
        elif not _is_harmony(self._header + pending):
            self._out[1].append(_without_markers(self._header + pending))
        self._header = ""
        return self._take()

    def _step(self) -> bool:
        """Consumes what it can of the pending text; False when the rest must wait for more."""
        if self._kind is None:
            return self._read_header()
        at, marker = _first_marker(self._pending, _BODY_MARKERS)
        if marker is None:
            keep = max(partial_suffix(self._pending, m) for m in _BODY_MARKERS)
            self._emit(self._pending[:len(self._pending) - keep])
            self._pending = self._pending[len(self._pending) - keep:]
            return False
        self._emit(self._pending[:at])
        self._pending = self._pending[at + (len(marker) if marker in _ENDS else 0):]
        self._kind, self._header = None, ""
        return True

    def _read_header(self) -> bool:
        at = self._pending.find(MESSAGE)
        if at < 0:
            keep = partial_suffix(self._pending, MESSAGE)
            self._header += self._pending[:len(self._pending) - keep]
            self._pending = self._pending[len(self._pending) - keep:]
            if not (self._opened_any or _may_open(self._header)) or (
                    len(self._header) > MAX_HEADER_CHARS and not _is_harmony(self._header)):
                return self._not_harmony()
            return False
        if not self._opened_any and not _may_open(self._header + self._pending[:at]):
            return self._not_harmony()
        header, self._header = self._header + self._pending[:at], ""
        self._pending = self._pending[at + len(MESSAGE):]
        self._open(header)
        return True

    def _not_harmony(self) -> bool:
        """The header read so far is no header: it and what follows are content."""
        self._pending, self._header = self._header + self._pending, ""
        self._kind, self._opened_any = "content", True
        return True

    def _open(self, header: str) -> None:
        """Starts the body of the message `header` describes (its text since the last `<|start|>`)."""
        self._opened_any = True
        header = header.rsplit(START, 1)[-1]
        recipient = _RECIPIENT.search(header)
        channel = _CHANNEL_NAME.search(header)
        if recipient is None or not self._calls:
            analysis = recipient is None and channel is not None and channel.group(1) == "analysis"
            self._kind = "reasoning" if analysis else "content"
            self.had_reasoning = self.had_reasoning or analysis
        elif self._max_calls is not None and self.num_calls >= self._max_calls:
            self._kind = "dropped"
        else:
            name = recipient.group(1).removeprefix(FUNCTIONS_PREFIX)
            self._out[2].append(ToolCallDelta(self.num_calls, new_call_id(), name))
            self.num_calls += 1
            self._kind = "call"

    def _emit(self, text: str) -> None:
        if not text:
            return
        if self._kind == "reasoning":
            self._out[0].append(text)
        elif self._kind == "content":
            self._out[1].append(text)
        elif self._kind == "call":
            self._out[2].append(ToolCallDelta(self.num_calls - 1, arguments=text))

    def _take(self) -> tuple[str, ParsedText]:
        reasoning, content, calls = self._out
        self._out = ([], [], [])
        return "".join(reasoning), ParsedText("".join(content), calls)


def _first_marker(text: str, markers: tuple[str, ...]) -> tuple[int, str | None]:
    """(where, which) of the earliest marker in `text`; (-1, None) if there is none."""
    found = [(at, marker) for marker in markers if (at := text.find(marker)) >= 0]
    return min(found) if found else (-1, None)


def _may_open(text: str) -> bool:
    """Whether a reply's first text may be a harmony header: `<|channel|>...` or ` to=NAME...`."""
    text = text.lstrip()
    return any(text.startswith(head) or head.startswith(text) for head in ("<|", "to="))


def _is_harmony(header: str) -> bool:
    return any(marker in header for marker in (START, CHANNEL, CONSTRAIN))


def _without_markers(text: str) -> str:
    for marker in (*HARMONY_MARKERS, END_OF_TEXT):
        text = text.replace(marker, "")
    return text
