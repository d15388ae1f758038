"""Special-token text in client strings stays text: `<|im_end|>` typed in a message is not a control token.

A chat prompt is the chat template rendered over the client's messages, and tokenizers match special
tokens anywhere in the text they get, so a user who types `<|im_end|>\n<|im_start|>system\n...` would
end their turn and write a system turn of their own. `SpecialTokenMask.hide` replaces every
special-token string in the client's values (message contents, names, tool calls, tool definitions,
template arguments) with a private-use marker before the template renders, so the special tokens
left in the rendered text are the template's own. The tokenizing side (`tidal.frontend.chat_tokens`)
splits the text at those, and tokenizes each piece that holds markers as plain text
(`Tokenizer.encode_plain`) after `restore` has put the original strings back.

A marker is `\\ue000<index>\\ue001`, the index naming an entry of `hidden`: the special tokens and the
two marker characters themselves (a client string holding one is hidden as well), so `restore` gives
back exactly what the client sent. Built once per tokenizer; read-only afterwards.
"""

from __future__ import annotations

import re

MARK_OPEN, MARK_CLOSE = "\ue000", "\ue001"
_MARKER = re.compile(MARK_OPEN + r"(\d+)" + MARK_CLOSE)


class SpecialTokenMask:
    def __init__(self, special_tokens: list[str]) -> None:
        self.hidden = sorted(set(special_tokens), key=len, reverse=True) + [MARK_OPEN, MARK_CLOSE]
        self._index = {text: i for i, text in enumerate(self.hidden)}
        self._pattern = re.compile("|".join(re.escape(text) for text in self.hidden))
        self.special_pattern = re.compile(
            "(" + "|".join(re.escape(t) for t in self.hidden[:-2]) + ")") if special_tokens else None
        """Splits a rendered prompt at the special tokens, keeping them as pieces (None: it has none)."""

    @classmethod
    def for_tokenizer(cls, tokenizer) -> SpecialTokenMask | None:
        """The mask of a `tidal.tokenizer.Tokenizer`'s special tokens; None for one without a backend."""
        backend = getattr(tokenizer, "backend", None)
        if backend is None:
            return None
        return cls([t.content for t in backend.get_added_tokens_decoder().values() if t.special and t.content])

    def hide(self, value):
        """`value` (a string, or dicts and lists of them, as JSON holds) with every special-token string
        in its strings replaced by a marker; anything else comes back as it was."""
        if isinstance(value, str):
            return self._pattern.sub(self._marker, value)
        if isinstance(value, dict):
            return {key: self.hide(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self.hide(item) for item in value)
        return value

    def _marker(self, match: re.Match) -> str:
        return f"{MARK_OPEN}{self._index[match.group()]}{MARK_CLOSE}"

    @staticmethod
    def holds_markers(text: str) -> bool:
        return MARK_OPEN in text

    def restore(self, text: str) -> str:
        """The text with every marker replaced by the string it hides."""
        return _MARKER.sub(lambda match: self.hidden[int(match.group(1))], text)
