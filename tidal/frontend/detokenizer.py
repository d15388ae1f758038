"""Token ids to text, incrementally, for one request at a time; plus stop strings.

`IncrementalDetokenizer` turns a request's output tokens into text as they arrive. It decodes
only a small window of tokens per step, never the whole output:

    ids:  ... | prefix window | pending tokens |
              ^ prefix_offset ^ read_offset

`prefix window` holds the tokens whose text was emitted last; decoding it together with the
pending tokens and subtracting its own text gives the pending tokens' text with the spacing
that depends on context right (SentencePiece drops the leading space of a decode's first
token, so decoding the pending tokens alone would lose it). Text whose last character is
U+FFFD is held (or cut back to the last token boundary where it is complete): a multi-byte
character is split over several byte tokens and its remaining bytes have not arrived yet.
After `_MAX_PENDING_TOKENS` held tokens the text is emitted anyway (the model produced bytes
that are not UTF-8; a full decode would show U+FFFD too).

`StopStringMatcher` watches the emitted text for stop strings. It keeps back the last
`max(len(stop)) - 1` characters so a stop string is never partly streamed, looks for a match
only in the held-back tail plus the new text, and cuts the output at the earliest match.

`OutputAssembler` joins the two for one request: token ids in (one at a time, so that a stop
string ends the output at the token that completed it), stable text out.

`TokenTextTable` gives each token's own text and bytes for logprobs.

All of these are pure and per request: no I/O, no locks.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

REPLACEMENT_CHAR = "\ufffd"
_MAX_PENDING_TOKENS = 8
_PROMPT_CONTEXT_TOKENS = 4


class DecodingTokenizer(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]: ...


class IncrementalDetokenizer:
    """Stable text for a growing token list; O(window) work per added token.

    Seeded with the prompt's last few tokens so that the first output token is decoded in
    context. Lifecycle: `add()` per token, `flush()` once at the end.
    """

    def __init__(self, tokenizer: DecodingTokenizer, prompt_token_ids: Sequence[int] = (),
                 skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids: list[int] = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._ids)

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)

    def add(self, token_id: int) -> str:
        """Appends one token; returns the text that became stable (often "", never partial)."""
        self._ids.append(token_id)
        return self._emit(final=False)

    def add_many(self, token_ids: Iterable[int]) -> str:
        self._ids.extend(token_ids)
        return self._emit(final=False)

    def flush(self) -> str:
        """Emits whatever is pending, even an incomplete character; call once at the end."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        num_pending = len(self._ids) - self._read_offset
        if num_pending == 0:
            return ""
        new_text = self._new_text(len(self._ids))
        if final or _is_stable(new_text):
            return self._advance(len(self._ids), new_text)
        # The last character is incomplete, but an earlier cut may be stable (several tokens
        # in one step, e.g. a run of byte-fallback tokens). Rare and short: try each cut.
        for end in range(len(self._ids) - 1, self._read_offset, -1):
            text = self._new_text(end)
            if _is_stable(text):
                return self._advance(end, text)
        if num_pending >= _MAX_PENDING_TOKENS:
            return self._advance(len(self._ids), new_text)  # not UTF-8; give up waiting
        return ""

    def _new_text(self, end: int) -> str:
        """Text of the pending tokens up to `end`, decoded in the prefix window's context."""
        return self._decode(self._ids[self._prefix_offset:end])[len(self._prefix_text):]

    def _advance(self, end: int, new_text: str) -> str:
        """Marks tokens up to `end` as emitted; they become the next prefix window."""
        del self._ids[:self._read_offset]  # ids before the new prefix window are not needed
        end -= self._read_offset
        self._prefix_offset = 0
        self._read_offset = end
        self._prefix_text = self._decode(self._ids[:end])
        return new_text


def _is_stable(text: str) -> bool:
    """Non-empty (a skipped special token adds nothing) and not ending mid-character."""
    return bool(text) and not text.endswith(REPLACEMENT_CHAR)


class StopStringMatcher:
    """Cuts text at the earliest stop string; holds back a tail that could start one."""

    def __init__(self, stop: Sequence[str], include_stop_str_in_output: bool = False) -> None:
        self.stop = tuple(s for s in stop if s)
        self.include_stop = include_stop_str_in_output
        self.holdback_chars = max((len(s) for s in self.stop), default=1) - 1
        self._tail = ""  # text seen but not yet released, at most holdback_chars long

    def feed(self, text: str, final: bool = False) -> tuple[str, bool]:
        """Returns (text safe to emit now, whether a stop string matched).

        After a match the caller must stop feeding: the request is finished.
        """
        if not self.stop:
            return text, False
        buffer = self._tail + text
        # A new match must end inside `text`; it starts at most holdback_chars before it,
        # i.e. inside `_tail`. Matches wholly inside `_tail` were found on an earlier call.
        match_at, match_len = -1, 0
        for s in self.stop:
            i = buffer.find(s)
            if i != -1 and (match_at == -1 or i < match_at):
                match_at, match_len = i, len(s)
        if match_at != -1:
            self._tail = ""
            end = match_at + (match_len if self.include_stop else 0)
            return buffer[:end], True
        if final:
            self._tail = ""
            return buffer, False
        cut = max(0, len(buffer) - self.holdback_chars)
        self._tail = buffer[cut:]
        return buffer[:cut], False


@dataclass(slots=True)
class AssembledText:
    text: str
    num_tokens: int
    """Tokens of the step that count as output (a stop-string match drops those after it)."""
    stopped: bool
    """A stop string matched: the request is finished with reason "stop"."""


class OutputAssembler:
    """One request's output: detokenization, hidden stop tokens, stop strings."""

    def __init__(self, tokenizer: DecodingTokenizer, prompt_token_ids: Sequence[int], *,
                 stop: Sequence[str] = (), include_stop_str_in_output: bool = False,
                 hidden_token_ids: Iterable[int] = (), skip_special_tokens: bool = True) -> None:
        self._detokenizer = IncrementalDetokenizer(tokenizer, prompt_token_ids,
                                                   skip_special_tokens)
        self._stop = StopStringMatcher(stop, include_stop_str_in_output)
        self._hidden_ids = frozenset(hidden_token_ids)
        self.finished = False

    def add(self, token_ids: Sequence[int], finished: bool = False,
            finish_reason: str | None = None) -> AssembledText:
        """Consumes one engine step's tokens; `finished` marks the request's last step.

        When the engine stops on an eos or stop token (reason "stop"), that token's text is
        not part of the output.
        """
        assert not self.finished, "OutputAssembler used after the request finished"
        if len(token_ids) == 1 and not finished and not self._stop.stop:
            # Nearly every step of a stream: one token, no stop strings to watch.
            return AssembledText(self._detokenizer.add(token_ids[0]), 1, False)
        pieces: list[str] = []
        last = len(token_ids) - 1
        for i, token_id in enumerate(token_ids):
            is_final = finished and i == last
            if is_final and finish_reason == "stop" and token_id in self._hidden_ids:
                text = self._detokenizer.flush()
            else:
                text = self._detokenizer.add(token_id)
                if is_final:
                    text += self._detokenizer.flush()
            emitted, stopped = self._stop.feed(text, final=is_final)
            pieces.append(emitted)
            if stopped:
                self.finished = True
                return AssembledText("".join(pieces), i + 1, True)
        if finished and not token_ids:
            emitted, stopped = self._stop.feed(self._detokenizer.flush(), final=True)
            pieces.append(emitted)
            self.finished = True
            return AssembledText("".join(pieces), 0, stopped)
        self.finished = finished
        return AssembledText("".join(pieces), len(token_ids), False)


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: printable character -> the byte it stands for."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


class TokenTextTable:
    """Each token's own text and raw bytes, for logprobs; cached per token id.

    A token's exact bytes come from the tokenizer's `token_bytes` when it has one; otherwise,
    for byte-level BPE vocabularies (GPT-2 style: SmolLM2, Llama 3, Qwen), from the printable
    alphabet that spells each byte; for SentencePiece vocabularies, from the piece itself
    ('▁' is a space, '<0xE2>' a byte); otherwise from decoding the token alone. A token whose
    bytes are part of a multi-byte character reads "bytes:\\xe2\\x80", as OpenAI writes it.
    """

    def __init__(self, tokenizer: DecodingTokenizer) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}
        self._token_bytes = getattr(tokenizer, "token_bytes", None)
        self._alphabet = None
        if self._token_bytes is None and _is_byte_level(tokenizer):
            self._alphabet = _byte_level_alphabet()

    def text_and_bytes(self, token_id: int) -> tuple[str, list[int]]:
        entry = self._cache.get(token_id)
        if entry is None:
            entry = self._compute(token_id)
            self._cache[token_id] = entry
        return entry

    def text(self, token_id: int) -> str:
        return self.text_and_bytes(token_id)[0]

    def _compute(self, token_id: int) -> tuple[str, list[int]]:
        raw = self._raw_bytes(token_id)
        if raw is None:
            text = self._tokenizer.decode([token_id], skip_special_tokens=False)
            return text, list(text.encode("utf-8"))
        try:
            return raw.decode("utf-8"), list(raw)
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), list(raw)

    def _raw_bytes(self, token_id: int) -> bytes | None:
        if self._token_bytes is not None:
            return bytes(self._token_bytes(token_id))
        piece = self._tokenizer.convert_ids_to_tokens([token_id])[0] or ""
        if self._alphabet is not None and piece and all(c in self._alphabet for c in piece):
            return bytes(self._alphabet[c] for c in piece)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)])  # SentencePiece byte fallback
        if "\u2581" in piece:  # SentencePiece's space; decoding the token alone would drop it
            return piece.replace("\u2581", " ").encode("utf-8")
        return None


def _is_byte_level(tokenizer: DecodingTokenizer) -> bool:
    """Heuristic: byte-level vocabularies spell a leading space as 'Ġ'."""
    encode = getattr(tokenizer, "encode", None)
    if encode is None:
        return False
    try:
        ids = encode(" hello world", add_special_tokens=False)
        pieces = tokenizer.convert_ids_to_tokens(list(ids))
    except Exception:
        return False
    return any(p is not None and p.startswith("Ġ") for p in pieces)
