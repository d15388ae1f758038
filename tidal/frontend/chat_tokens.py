"""Chat prompts tokenized a turn at a time: the unchanged history is not tokenized again.

A chat request carries the whole conversation, so tokenizing its templated prompt from scratch
costs more with every turn (a 600-word system prompt and six turns: 1-2 ms a turn, 7-14 us of the
frontend's CPU per streamed token, `benchmarks/frontend_path.py`). Tokenizers split text at their
added tokens before anything else, and each piece between two of them is tokenized on its own; so
the prompt's ids are the concatenation of its pieces' ids, cut at the special tokens the template
writes between messages (`<|im_start|>`, `<|eot_id|>`, ...). `ChatTokenCache` keeps recent pieces'
ids (an LRU bounded in tokens): the system prompt every session shares and every earlier turn of a
conversation are hits, and only the new turn is tokenized.

Where that split is not exact (a tokenizer that treats the first piece specially, or a special token
that eats the spaces around it), the cache checks itself at start-up on a few probe prompts and, if
any differs from the whole-text encoding, turns itself off: `encode` then tokenizes whole texts.
Owns: the LRU (piece text -> ids). Not thread-safe: one per event loop.
"""

from __future__ import annotations

import asyncio
import logging
import re
from array import array
from collections import OrderedDict
from collections.abc import Callable
from typing import TypeVar

from tidal.frontend.special_token_mask import SpecialTokenMask

logger = logging.getLogger(__name__)
T = TypeVar("T")

MAX_CACHED_TOKENS = 4_000_000  # about 32 MB of ids
MAX_CACHED_PIECE_CHARS = 65_536
"""Longer pieces are tokenized every time, not kept (`ChatTokenCache._store`)."""
TOKENIZE_IN_THREAD_CHARS = 2048
"""New text at least this long is tokenized on a worker thread (`encode_batch` lets go of the GIL), so
the event loop keeps streaming other requests' tokens; shorter stays inline (a thread hop costs ~50 us)."""

_PROBES = (
    [{"role": "system", "content": "You are a helpful assistant.\n\n  Answer briefly."},
     {"role": "user", "content": " Hello there!  How are you?\n"},
     {"role": "assistant", "content": "I'm fine — thanks. 日本語もOK."},
     {"role": "user", "content": "\n\nTell me a story about <b>tides</b>."}],
    [{"role": "user", "content": "x"}],
)


class ChatTokenCache:
    def __init__(self, tokenizer, mask: SpecialTokenMask | None = None,
                 max_cached_tokens: int = MAX_CACHED_TOKENS) -> None:
        self.tokenizer = tokenizer
        self.mask = mask
        self.max_cached_tokens = max_cached_tokens
        self._pieces: OrderedDict[str, array] = OrderedDict()
        self._cached_tokens = 0
        self.hits = self.misses = 0
        self._split = _special_token_pattern(tokenizer)
        self.enabled = self._split is not None and self._self_check()
        if not self.enabled:
            logger.info("chat prompts are tokenized whole (the per-turn cache does not fit this tokenizer)")

    async def encode(self, text: str) -> list[int]:
        """The ids of a templated chat prompt (no special tokens added: the template wrote them).
        Pieces holding `mask`'s markers (client text whose special-token strings it hid) are
        tokenized as plain text, and not cached."""
        if not self.enabled:
            if self.mask is not None and self.mask.holds_markers(text):
                return await _off_loop(len(text), lambda: masked_ids(self.tokenizer, self.mask, text))
            return await encode_text(self.tokenizer, text, add_special_tokens=False)
        pieces = [p for p in self._split.split(text) if p]
        missing = [p for p in dict.fromkeys(pieces) if p not in self._pieces]
        fresh = dict(zip(missing, await self._encode_pieces(missing))) if missing else {}
        ids: list[int] = []
        for piece in pieces:
            cached = self._pieces.get(piece)
            if cached is None:
                ids.extend(fresh[piece])
            else:
                ids.extend(cached)
                self._pieces.move_to_end(piece)
        self.hits += len(pieces) - len(missing)
        self.misses += len(missing)
        self._store(fresh)
        return ids

    async def _encode_pieces(self, pieces: list[str]) -> list[list[int]]:
        tokenizer, mask = self.tokenizer, self.mask

        def run() -> list[list[int]]:
            if mask is None or not any(mask.holds_markers(p) for p in pieces):
                return tokenizer.encode_batch(pieces, add_special_tokens=False)
            return [masked_ids(tokenizer, mask, p) if mask.holds_markers(p)
                    else tokenizer.encode_batch([p], add_special_tokens=False)[0] for p in pieces]

        return await _off_loop(sum(map(len, pieces)), run)

    def _store(self, fresh: dict[str, list[int]]) -> None:
        """Keeps the new pieces worth keeping: not client text with hidden markers (rare, and their
        ids are not the plain tokenization of their key), not one longer than MAX_CACHED_PIECE_CHARS
        (a long piece seldom comes again; keeping it would hold megabytes)."""
        for piece, ids in fresh.items():
            if len(piece) > MAX_CACHED_PIECE_CHARS or (self.mask is not None and self.mask.holds_markers(piece)):
                continue
            self._pieces[piece] = array("l", ids)
            self._cached_tokens += len(ids)
        while self._cached_tokens > self.max_cached_tokens and self._pieces:
            _, old = self._pieces.popitem(last=False)
            self._cached_tokens -= len(old)

    def _self_check(self) -> bool:
        tokenizer = self.tokenizer
        for messages in _PROBES:
            try:
                text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            except Exception:  # noqa: BLE001 - a template that refuses a probe (e.g. no system role)
                text = "".join(m["content"] for m in messages)
            whole = tokenizer.encode(text, add_special_tokens=False)
            pieces = [p for p in self._split.split(text) if p]
            split = [i for ids in tokenizer.encode_batch(pieces, add_special_tokens=False) for i in ids]
            if split != whole:
                return False
        return True


def masked_ids(tokenizer, mask: SpecialTokenMask, text: str) -> list[int]:
    """The ids of rendered text whose client strings `mask` hid: the special tokens left in it (the
    template's) as themselves, every other piece restored and tokenized as plain text. Runs inline."""
    parts = mask.special_pattern.split(text) if mask.special_pattern is not None else [text]
    plain = tokenizer.encode_plain([mask.restore(part) for part in parts[0::2]])
    ids: list[int] = []
    for index, part in enumerate(parts):
        if index % 2:
            ids.append(tokenizer.backend.token_to_id(part))
        else:
            ids.extend(plain[index // 2])
    return ids


async def _off_loop(num_chars: int, run: Callable[[], T]) -> T:
    """`run()` on a worker thread when it tokenizes at least TOKENIZE_IN_THREAD_CHARS (it must let go
    of the GIL: `encode_batch`), inline otherwise (a thread hop costs ~50 us)."""
    if num_chars < TOKENIZE_IN_THREAD_CHARS:
        return run()
    return await asyncio.to_thread(run)


def _special_token_pattern(tokenizer) -> re.Pattern | None:
    """A regex that splits text at the tokenizer's special tokens, keeping them as pieces; None when
    there are none usable (a special token that strips the spaces around it changes its neighbours)."""
    backend = getattr(tokenizer, "backend", None)
    if backend is None:
        return None
    specials = [t.content for t in backend.get_added_tokens_decoder().values()
                if t.special and t.content and not t.lstrip and not t.rstrip]
    if not specials:
        return None
    return re.compile("(" + "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")")


async def encode_text(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    """One text's ids; a long one on a worker thread, through `encode_batch`, which (unlike `encode`
    in tokenizers 0.23) lets go of the GIL while it works."""
    if not hasattr(tokenizer, "encode_batch"):  # a tokenizer without it (a test double)
        return await _off_loop(len(text), lambda: list(tokenizer.encode(text, add_special_tokens=add_special_tokens)))
    return await _off_loop(len(text), lambda: tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0])
