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

logger = logging.getLogger(__name__)

MAX_CACHED_TOKENS = 4_000_000  # about 16 MB of ids
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
    def __init__(self, tokenizer, max_cached_tokens: int = MAX_CACHED_TOKENS) -> None:
        self.tokenizer = tokenizer
        self.max_cached_tokens = max_cached_tokens
        self._pieces: OrderedDict[str, array] = OrderedDict()
        self._cached_tokens = 0
        self.hits = self.misses = 0
        self._split = _special_token_pattern(tokenizer)
        self.enabled = self._split is not None and self._self_check()
        if not self.enabled:
            logger.info("chat prompts are tokenized whole (the per-turn cache does not fit this tokenizer)")

    async def encode(self, text: str) -> list[int]:
        """The ids of a templated chat prompt (no special tokens added: the template wrote them)."""
        if not self.enabled:
            return await encode_text(self.tokenizer, text, add_special_tokens=False)
        pieces = [p for p in self._split.split(text) if p]
        missing = [p for p in dict.fromkeys(pieces) if p not in self._pieces]
        if missing:
            self._store(missing, await self._encode_pieces(missing))
        ids: list[int] = []
        for piece in pieces:
            ids.extend(self._pieces[piece])
            self._pieces.move_to_end(piece)
        self.hits += len(pieces) - len(missing)
        self.misses += len(missing)
        return ids

    async def _encode_pieces(self, pieces: list[str]) -> list[list[int]]:
        backend = self.tokenizer.backend

        def run() -> list[list[int]]:
            return [e.ids for e in backend.encode_batch(pieces, add_special_tokens=False)]

        if sum(map(len, pieces)) < TOKENIZE_IN_THREAD_CHARS:
            return run()
        return await asyncio.to_thread(run)

    def _store(self, pieces: list[str], encoded: list[list[int]]) -> None:
        for piece, ids in zip(pieces, encoded):
            self._pieces[piece] = array("l", ids)
            self._cached_tokens += len(ids)
        while self._cached_tokens > self.max_cached_tokens and len(self._pieces) > len(pieces):
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
            split = [i for e in tokenizer.backend.encode_batch(pieces, add_special_tokens=False) for i in e.ids]
            if split != whole:
                return False
        return True


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
    if len(text) < TOKENIZE_IN_THREAD_CHARS:
        return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))
    backend = getattr(tokenizer, "backend", None)
    if backend is None:
        return await asyncio.to_thread(lambda: list(tokenizer.encode(text, add_special_tokens=add_special_tokens)))
    return await asyncio.to_thread(lambda: backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids)
