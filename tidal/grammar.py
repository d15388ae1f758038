"""What a `StructuredOutput` means to the grammar library (llguidance): its grammar, and whether the
library takes it.

`GrammarCompiler` compiles constraints over one tokenizer, caching the result (a compiled matcher,
or the library's reason for refusing) per constraint. The engine copies a compiled matcher per
request (`engine/structured_output.py`); the frontend compiles the same constraint the same way
before a request leaves it (`frontend/structured_fields.py`), so what the frontend lets through the
engine takes, and a bad one is a 400 naming the field. `check` is the tokenizer-free part of that
(syntax only), for a frontend without a real tokenizer.
Why llguidance and not xgrammar: docs/benchmarks.md ("Grammar cost"); in short, it compiles a JSON
schema in about a millisecond, needs neither torch nor transformers (the frontend imports it), and
its masks cost well under a step.

JSON is written with one space after ':' and ',' and no other whitespace: with free whitespace a
small model may pad its output with newlines until max_tokens, which is valid JSON and useless.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from functools import lru_cache

import llguidance
import llguidance.numpy
import numpy as np

from tidal.protocol import StructuredOutput
from tidal.tokenizer import Tokenizer

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_JSON_OBJECT = '{"type": "object"}'


def grammar_text(structured: StructuredOutput) -> str:
    """llguidance's grammar for `structured`; ValueError when the spec cannot be one (a schema
    that is not JSON, choices that are not a list of strings). The library may still refuse it."""
    kind, spec = structured.kind, structured.spec
    if kind == "json":
        return llguidance.LLMatcher.grammar_from_json_schema(spec, defaults=JSON_OPTIONS)
    if kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema(ANY_JSON_OBJECT, defaults=JSON_OPTIONS)
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec)
    if kind == "choice":
        choices = json.loads(spec)
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
            raise ValueError("choices must be a non-empty list of non-empty strings")
        return llguidance.grammar_from("choice", choices)
    if kind == "grammar":
        return llguidance.grammar_from("grammar", spec)  # Lark, or GBNF (converted to Lark)
    raise ValueError(f"unknown structured output kind {kind!r}")


@lru_cache(maxsize=1024)
def check(kind: str, spec: str) -> str:
    """'' when llguidance's grammar checks pass for this constraint (no tokenizer: syntax and
    schema only), else the library's reason. Cached: clients tend to send one schema many times."""
    try:
        grammar = grammar_text(StructuredOutput(kind=kind, spec=spec))  # type: ignore[arg-type]
    except ValueError as exc:
        return str(exc)
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    return messages[0] if is_error else ""


class GrammarCompiler:
    """Constraints compiled over one tokenizer; safe to call from several threads.

    A compile builds the matcher (the library's lexer over the vocabulary) and computes its first
    mask on a copy: the two steps where a pathological constraint fails or takes long, so both
    happen once per constraint, here, rather than in an engine step."""

    def __init__(self, tokenizer: Tokenizer, cache_size: int = 256):
        self._source = tokenizer
        self._lltokenizer: llguidance.LLTokenizer | str | None = None  # built at the first compile
        self.vocab_size = tokenizer.vocab_size
        self.cache_size = cache_size
        self._cache: OrderedDict[StructuredOutput, llguidance.LLMatcher | str] = OrderedDict()
        self._lock = threading.Lock()

    def cached(self, structured: StructuredOutput) -> llguidance.LLMatcher | str | None:
        """The compiled matcher or the refusal, if `structured` was compiled; else None."""
        with self._lock:
            compiled = self._cache.get(structured)
            if compiled is not None:
                self._cache.move_to_end(structured)
            return compiled

    def compile(self, structured: StructuredOutput) -> llguidance.LLMatcher | str:
        """A compiled matcher (copy it per request: `deep_copy()`), or why the library refuses the
        constraint."""
        compiled = self.cached(structured)
        if compiled is None:
            compiled = self._compile(structured)
            with self._lock:
                self._cache[structured] = compiled
                if len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return compiled

    def _library_tokenizer(self) -> llguidance.LLTokenizer | str:
        """The library's view of the vocabulary, built once, on first use (it takes 0.2-1 s, and a
        tokenizer it can't read must not keep a model from serving free text): or why it can't be."""
        with self._lock:
            if self._lltokenizer is None:
                source = self._source
                try:
                    self._lltokenizer = llguidance.LLTokenizer(
                        source.backend.to_str(), n_vocab=source.vocab_size, eos_token=sorted(source.eos_token_ids))
                except ValueError as exc:
                    self._lltokenizer = f"structured output is not available for this model's tokenizer ({exc})"
            return self._lltokenizer

    def _compile(self, structured: StructuredOutput) -> llguidance.LLMatcher | str:
        try:
            grammar = grammar_text(structured)
        except ValueError as exc:
            return str(exc)
        lltokenizer = self._library_tokenizer()
        if isinstance(lltokenizer, str):
            return lltokenizer
        matcher = llguidance.LLMatcher(lltokenizer, grammar, log_level=0)
        if matcher.is_error():
            return matcher.get_error()
        probe = matcher.deep_copy()
        llguidance.numpy.fill_next_token_bitmask(probe, np.zeros((1, (self.vocab_size + 31) // 32), np.int32), 0)
        if probe.is_error():
            return probe.get_error()
        return matcher
