"""ChatTokenCache: a chat prompt's ids equal the whole text's, while the history is not tokenized again."""

from __future__ import annotations

import random

import pytest

from tidal.frontend.chat_tokens import ChatTokenCache
from tidal.tokenizer import load_tokenizer

WORDS = ["tide", " moon", "\n", "  ", "Paris", "日本", "—", "<b>", "x", "?", "\t", "don't", "1234", " the"]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


def _text(rng: random.Random) -> str:
    return "".join(rng.choice(WORDS) for _ in range(rng.randrange(0, 40)))


async def test_conversations_tokenize_as_whole_texts_and_reuse_their_history(tokenizer):
    cache = ChatTokenCache(tokenizer)
    assert cache.enabled
    rng = random.Random(0)
    system = {"role": "system", "content": "You are a tidal expert. " * 50}
    for _ in range(20):
        messages = [system]
        for turn in range(4):
            messages.append({"role": "user", "content": _text(rng)})
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            misses = cache.misses
            assert await cache.encode(text) == tokenizer.encode(text, add_special_tokens=False)
            if turn:  # only the new turn's pieces (and the generation prompt's) are new
                assert cache.misses - misses <= 3
            messages.append({"role": "assistant", "content": _text(rng)})
    assert cache.hits > cache.misses


async def test_the_cache_stays_within_its_token_bound(tokenizer):
    cache = ChatTokenCache(tokenizer, max_cached_tokens=200)
    for i in range(50):
        text = tokenizer.apply_chat_template([{"role": "user", "content": f"question {i} " * 10}])
        assert await cache.encode(text) == tokenizer.encode(text, add_special_tokens=False)
    assert sum(len(ids) for ids in cache._pieces.values()) <= 200 + 60


class _Encoding:
    def __init__(self, ids):
        self.ids = ids


class _PieceDependentBackend:
    """TEST DOUBLE of a tokenizers.Tokenizer whose ids depend on where the text is cut (as a
    tokenizer that marks only the first piece would): the split check must catch it."""

    class _Special:
        content, special, lstrip, rstrip = "<|end|>", True, False, False

    def get_added_tokens_decoder(self):
        return {0: self._Special()}

    def encode_batch(self, texts, add_special_tokens=False):
        return [_Encoding([len(t)]) for t in texts]


class _PieceDependentTokenizer:
    backend = _PieceDependentBackend()

    def apply_chat_template(self, messages, add_generation_prompt=True):
        return "<|end|>".join(m["content"] for m in messages)

    def encode(self, text, add_special_tokens=False):
        return [len(text)]

    def encode_batch(self, texts, add_special_tokens=False):
        return [e.ids for e in self.backend.encode_batch(texts)]


async def test_a_tokenizer_that_does_not_split_cleanly_is_tokenized_whole():
    cache = ChatTokenCache(_PieceDependentTokenizer())
    assert not cache.enabled
    assert await cache.encode("a<|end|>bc") == [len("a<|end|>bc")]
