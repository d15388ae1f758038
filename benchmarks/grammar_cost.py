"""What a grammar costs the sampler: xgrammar against llguidance, on this machine's CPU.

For each library and vocabulary: the one-off tokenizer preparation, the compile time of a typical
JSON schema (cold: no cache), then the token-mask cost per decode step while a valid document of
that schema is fed token by token, at batch 1 (one matcher) and batch 64 (64 matchers filled
together with the library's batch call), and the cost of accepting the sampled token. Also the
library's import time in a fresh interpreter (a frontend process validates with it too).

Vocabularies: the embedded SmolLM2 tokenizer (49,152 tokens) and a synthetic 128,256-token one
(SmolLM2's tokens plus concatenations of random pairs of them, so longer tokens, like Llama 3's
vocabulary; the Llama 3 tokenizer itself is not available offline).

    python -m benchmarks.grammar_cost [--nice -10] [--libraries xgrammar,llguidance] [--vocabs 49152,128256]
                                      [--batch 1,64] [--json /tmp/tidal-bench/grammar_cost.json]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np

from tidal.tokenizer import Tokenizer, _byte_to_unicode, load_tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "email": {"type": "string", "pattern": "^[a-z0-9.]+@[a-z0-9.]+$"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 8},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "role": {"enum": ["admin", "user", "guest"]},
        "score": {"type": "number"},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "email", "tags", "address", "role", "score", "active"],
    "additionalProperties": False,
}
DOCUMENT = ('{"name": "Ada Lovelace", "age": 36, "email": "ada@analytical.org", "tags": ["math", "poetry", '
            '"engines"], "address": {"city": "London", "zip": "W1"}, "role": "admin", "score": 99.5, '
            '"active": true}')
SYNTHETIC_VOCAB = 128256


@dataclass
class Vocabulary:
    """A tokenizer as both libraries take it: every token's bytes, eos ids, and the document's ids."""

    name: str
    token_bytes: list[bytes]
    eos_token_ids: list[int]
    document_ids: list[int]
    tokenizer_json: str  # as a Hugging Face tokenizers JSON


def embedded_vocabulary(tokenizer: Tokenizer) -> Vocabulary:
    pieces = [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
    return Vocabulary(f"SmolLM2 {tokenizer.vocab_size}", pieces, sorted(tokenizer.eos_token_ids),
                      tokenizer.encode(DOCUMENT, add_special_tokens=False), tokenizer.backend.to_str())


def synthetic_vocabulary(base: Vocabulary, size: int) -> Vocabulary:
    """`base` plus concatenations of random pairs of its ordinary tokens, up to `size` distinct
    tokens (added to the BPE vocabulary with no merges); the document tokenized by greedy longest
    match."""
    rng = random.Random(0)
    pieces = list(base.token_bytes)
    seen = set(pieces)
    ordinary = [p for i, p in enumerate(base.token_bytes) if p and i not in base.eos_token_ids and i > 16]
    while len(pieces) < size:
        piece = rng.choice(ordinary) + rng.choice(ordinary)
        if piece not in seen:
            seen.add(piece)
            pieces.append(piece)
    ids = {p: i for i, p in enumerate(pieces) if i > 16}
    longest = max(map(len, pieces))
    data, document_ids, at = DOCUMENT.encode(), [], 0
    while at < len(data):
        for n in range(min(longest, len(data) - at), 0, -1):
            if data[at:at + n] in ids:
                document_ids.append(ids[data[at:at + n]])
                at += n
                break
        else:
            raise ValueError(f"no token for byte {data[at]}")
    spec = json.loads(base.tokenizer_json)
    to_unicode = _byte_to_unicode()
    for token_id in range(len(base.token_bytes), size):
        spec["model"]["vocab"]["".join(to_unicode[b] for b in pieces[token_id])] = token_id
    return Vocabulary(f"synthetic {size}", pieces, base.eos_token_ids, document_ids, json.dumps(spec))


class XGrammarBackend:
    name = "xgrammar"

    def __init__(self, vocab: Vocabulary):
        import xgrammar
        self.xgr = xgrammar
        self.info = xgrammar.TokenizerInfo(vocab.token_bytes, xgrammar.VocabType.RAW,
                                           vocab_size=len(vocab.token_bytes), stop_token_ids=vocab.eos_token_ids)
        self.vocab_size = len(vocab.token_bytes)
        self.batcher = xgrammar.BatchGrammarMatcher()

    def compile(self, schema: str):
        compiler = self.xgr.GrammarCompiler(self.info, cache_enabled=False)
        return compiler.compile_json_schema(schema, any_whitespace=False)

    def matchers(self, compiled, n: int) -> list:
        return [self.xgr.GrammarMatcher(compiled) for _ in range(n)]

    def fill(self, matchers: list, mask: np.ndarray) -> None:
        import torch
        target = torch.from_numpy(mask)
        if len(matchers) == 1:
            matchers[0].fill_next_token_bitmask(target, 0)
        else:
            self.batcher.batch_fill_next_token_bitmask(matchers, target)

    def accept(self, matchers: list, token_id: int) -> None:
        for m in matchers:
            assert m.accept_token(token_id), token_id


class LLGuidanceBackend:
    name = "llguidance"

    def __init__(self, vocab: Vocabulary):
        import llguidance
        import llguidance.numpy
        self.llg = llguidance
        self.llg_numpy = llguidance.numpy
        self.tokenizer = llguidance.LLTokenizer(vocab.tokenizer_json, n_vocab=len(vocab.token_bytes),
                                                eos_token=vocab.eos_token_ids)
        self.vocab_size = len(vocab.token_bytes)
        self.executor = llguidance.LLExecutor()

    def compile(self, schema: str):
        grammar = self.llg.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})
        matcher = self.llg.LLMatcher(self.tokenizer, grammar)  # builds the lexer: llguidance's "compile"
        assert not matcher.is_error(), matcher.get_error()
        return matcher

    def matchers(self, template, n: int) -> list:
        return [template.deep_copy() for _ in range(n)]  # copies share the template's lexer states

    def fill(self, matchers: list, mask: np.ndarray) -> None:
        if len(matchers) == 1:
            self.llg_numpy.fill_next_token_bitmask(matchers[0], mask, 0)
        else:
            self.llg_numpy.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(matchers)],
                                                       mask)

    def accept(self, matchers: list, token_id: int) -> None:
        for m in matchers:
            assert m.consume_token(token_id), (token_id, m.get_error())


def import_seconds(library: str) -> tuple[float, bool]:
    """Seconds to import the library in a fresh interpreter, and whether that imported torch."""
    code = (f"import time,sys; t=time.perf_counter(); import {library}; "
            "print(time.perf_counter()-t, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return float(out[0]), out[1] == "True"


def measure(backend_cls, vocab: Vocabulary, batches: list[int], compile_runs: int) -> list[dict]:
    started = time.perf_counter()
    backend = backend_cls(vocab)
    setup_s = time.perf_counter() - started
    schema = json.dumps(SCHEMA)
    compile_s = []
    for _ in range(compile_runs):
        started = time.perf_counter()
        compiled = backend.compile(schema)
        compile_s.append(time.perf_counter() - started)
    rows = []
    for batch in batches:
        compiled = backend.compile(schema)  # each batch size starts from a cold grammar
        cold_fill_s, _ = run_document(backend, vocab, backend.matchers(compiled, batch))
        fill_s, accept_s = run_document(backend, vocab, backend.matchers(compiled, batch))
        rows.append({"library": backend.name, "vocab": vocab.name, "batch": batch, "setup_s": setup_s,
                     "compile_ms": 1e3 * statistics.median(compile_s), "steps": len(fill_s),
                     "cold_mask_ms_mean": 1e3 * statistics.fmean(cold_fill_s),
                     "mask_ms_mean": 1e3 * statistics.fmean(fill_s), "mask_ms_p50": 1e3 * statistics.median(fill_s),
                     "mask_ms_max": 1e3 * max(fill_s), "accept_ms_mean": 1e3 * statistics.fmean(accept_s)})
    return rows


def run_document(backend, vocab: Vocabulary, matchers: list) -> tuple[list[float], list[float]]:
    """Feed the document to every matcher, one token per step: (mask seconds, accept seconds) per step."""
    mask = np.full((len(matchers), (backend.vocab_size + 31) // 32), -1, dtype=np.int32)
    fill_s, accept_s = [], []
    for token_id in vocab.document_ids:
        started = time.perf_counter()
        backend.fill(matchers, mask)
        fill_s.append(time.perf_counter() - started)
        bit = (int(mask[-1, token_id // 32]) >> (token_id % 32)) & 1
        assert bit, f"{backend.name} masked out the document's token {token_id}"
        started = time.perf_counter()
        backend.accept(matchers, token_id)
        accept_s.append(time.perf_counter() - started)
    return fill_s, accept_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--libraries", default="xgrammar,llguidance")
    parser.add_argument("--vocabs", default=f"49152,{SYNTHETIC_VOCAB}")
    parser.add_argument("--batch", default="1,64")
    parser.add_argument("--compile-runs", type=int, default=3)
    parser.add_argument("--nice", type=int, default=0, help="niceness (negative: root only; shields the timing "
                        "from other work on a shared box)")
    parser.add_argument("--json", default="/tmp/tidal-bench/grammar_cost.json")
    args = parser.parse_args()
    if args.nice:
        os.setpriority(os.PRIO_PROCESS, 0, args.nice)
    backends = {"xgrammar": XGrammarBackend, "llguidance": LLGuidanceBackend}
    libraries = args.libraries.split(",")
    batches = [int(b) for b in args.batch.split(",")]
    embedded = embedded_vocabulary(load_tokenizer(None))
    vocabs = [embedded if int(v) == len(embedded.token_bytes) else synthetic_vocabulary(embedded, int(v))
              for v in args.vocabs.split(",")]
    print(f"cpu cores: {os.cpu_count()}; document: {len(DOCUMENT)} chars")
    imports = {name: import_seconds(name) for name in libraries}
    for name, (seconds, torch_loaded) in imports.items():
        print(f"import {name}: {seconds:.2f} s (imports torch: {torch_loaded})")
    for name in libraries:
        importlib.import_module(name)  # imported before timing the tokenizer setup
    rows = [row for vocab in vocabs for name in libraries for row in measure(backends[name], vocab, batches,
                                                                             args.compile_runs)]
    print("\n| library | vocabulary | tokenizer setup s | schema compile ms | batch | mask ms/step: first use "
          "| warm mean | warm p50 | warm max | accept ms/step |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['library']} | {r['vocab']} | {r['setup_s']:.2f} | {r['compile_ms']:.1f} | {r['batch']} "
              f"| {r['cold_mask_ms_mean']:.3f} | {r['mask_ms_mean']:.3f} | {r['mask_ms_p50']:.3f} "
              f"| {r['mask_ms_max']:.2f} | {r['accept_ms_mean']:.3f} |")
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"imports": imports, "rows": rows}, f, indent=1)
    print(f"\nJSON: {args.json}")


if __name__ == "__main__":
    main()
