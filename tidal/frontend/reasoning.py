"""A thinking model's reasoning split from its answer: `<think>...</think>` -> `reasoning_content`.

Models that think (Qwen3, DeepSeek-R1 and its distills) write their reasoning between `<think>` and
`</think>`, then the answer. `ReasoningParser` is fed the reply's text a step at a time and returns
what is certain to be reasoning and what is certain to be content; a partial tag at the end is held
back until the next step decides it. Where the reply starts:

- `qwen3`: in reasoning if the prompt ends with an opened `<think>` (templates that open it
  themselves), else the reply may open with `<think>`; a reply that opens with anything else has no
  reasoning (Qwen3 with thinking turned off).
- `deepseek_r1`: always in reasoning (R1's template opens `<think>`, and its models sometimes skip
  writing it); a `<think>` at the very start is dropped.

A reply cut before `</think>` is all reasoning. Whitespace at the start of each part is dropped
(models put newlines after the tags). Lifecycle: `feed` any number of times, then `finish` once;
`in_reasoning` says where the next text goes.
"""

from __future__ import annotations

from typing import Literal

from tidal.frontend.tool_parsers import partial_suffix

ReasoningMode = Literal["qwen3", "deepseek_r1"]
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def starts_in_reasoning(mode: ReasoningMode, prompt: str) -> bool:
    """Whether a reply to `prompt` begins inside its reasoning."""
    return mode == "deepseek_r1" or prompt.rstrip().endswith(THINK_OPEN)


class ReasoningParser:
    def __init__(self, in_reasoning: bool) -> None:
        self._state = "opening"  # opening (a <think> may come) | reasoning | content
        self._opening_goes_to = "reasoning" if in_reasoning else "content"
        self._pending = ""
        self._strip_start = True  # drop whitespace at the start of the current part
        self.had_reasoning = in_reasoning

    @property
    def in_reasoning(self) -> bool:
        """The text fed next belongs to the reasoning (or may: the reply has not opened yet)."""
        return self._state == "reasoning" or (self._state == "opening" and self._opening_goes_to == "reasoning")

    def feed(self, text: str) -> tuple[str, str]:
        """(reasoning, content) that `text` decided."""
        self._pending += text
        reasoning, content = "", ""
        while self._pending:
            if self._state == "opening":
                rest = self._pending.lstrip()
                if rest.startswith(THINK_OPEN):
                    self._pending = rest[len(THINK_OPEN):]
                    self._enter("reasoning")
                elif not rest or THINK_OPEN.startswith(rest):
                    break  # maybe the tag: wait
                else:
                    self._enter(self._opening_goes_to)
            elif self._state == "reasoning":
                at = self._pending.find(THINK_CLOSE)
                if at < 0:
                    keep = partial_suffix(self._pending, THINK_CLOSE)
                    reasoning += self._part(self._pending[:len(self._pending) - keep])
                    self._pending = self._pending[len(self._pending) - keep:]
                    break
                reasoning += self._part(self._pending[:at])
                self._pending = self._pending[at + len(THINK_CLOSE):]
                self._enter("content")
            else:
                content += self._part(self._pending)
                self._pending = ""
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """(reasoning, content) still held: a partial tag at the end is text after all."""
        pending, self._pending = self._pending, ""
        if self._state == "opening" and self._opening_goes_to == "content":
            return "", self._part(pending)
        if self._state == "content":
            return "", self._part(pending)
        return self._part(pending), ""

    def _enter(self, state: str) -> None:
        self._state = state
        self._strip_start = True
        self.had_reasoning = self.had_reasoning or state == "reasoning"

    def _part(self, text: str) -> str:
        if self._strip_start:
            text = text.lstrip()
            self._strip_start = not text
        return text
