"""`Tokenizer`: text <-> token ids and chat templates, over the `tokenizers` library.

Built once from a GGUF file's metadata or a Hugging Face folder (`load_tokenizer`), then
read-only: safe to share between coroutines. Imports no torch (the frontend loads only this).
Chat prompts rendered by `apply_chat_template` already hold their special tokens, so encode
them with `add_special_tokens=False`.
"""

from __future__ import annotations

import copy
import json
import os
from datetime import datetime
from functools import cached_property, lru_cache

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer

from tidal.models.gguf_file import GGUFFile
from tidal.models.source import embedded_gguf_path, resolve_model_source

# Tokens that end a turn in common chat formats; counted as stop tokens when the vocabulary
# has them as special tokens (what llama.cpp calls end-of-generation tokens).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|endoftext|>", "<|end_of_text|>",
                      "<|end|>", "<end_of_turn>", "<|return|>", "<|call|>")
HARMONY_CHANNEL_TOKEN = "<|channel|>"
"""In a vocabulary with this token (gpt-oss's harmony), `<|end|>` ends one message of a reply (its
reasoning), not the reply: `<|return|>` and `<|call|>` do."""


class Tokenizer:
    """One tokenizer: a `tokenizers.Tokenizer` plus special tokens and the chat template."""

    def __init__(self, backend: BackendTokenizer, *, bos_token: str | None = None, eos_token: str | None = None,
                 eos_token_ids: set[int] | None = None, chat_template: str | None = None,
                 extra_template_vars: dict | None = None):
        self.backend = backend
        # Some tokenizer.json files carry truncation or padding settings meant for training.
        backend.no_truncation()
        backend.no_padding()
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_token_id = backend.token_to_id(bos_token) if bos_token else None
        self.eos_token_id = backend.token_to_id(eos_token) if eos_token else None
        self.chat_template = chat_template
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        added = backend.get_added_tokens_decoder()  # {id: AddedToken}
        self._added_ids = frozenset(added)
        self.all_special_ids = sorted(i for i, t in added.items() if t.special)
        ends = {i for i, t in added.items() if t.special and t.content in END_OF_TURN_TOKENS}
        if any(t.content == HARMONY_CHANNEL_TOKEN for t in added.values()):
            ends -= {i for i, t in added.items() if t.content == "<|end|>"}
        self.eos_token_ids = frozenset((eos_token_ids or set()) | ends
                                       | ({self.eos_token_id} if self.eos_token_id is not None else set()))
        self._template_vars = {"bos_token": bos_token or "", "eos_token": eos_token or "",
                               **(extra_template_vars or {})}
        self._id_to_piece = _vocab_list(backend, self.vocab_size)
        self._byte_level = isinstance(backend.decoder, decoders.ByteLevel)

    # ---- ids <-> text ----

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Each text's ids. Unlike `encode`, `tokenizers` lets go of the GIL while this one works, so
        a long text tokenized on a worker thread leaves the event loop free."""
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def encode_plain(self, texts: list[str]) -> list[list[int]]:
        """Each text's ids with special-token strings in it tokenized as the plain text they are
        (`<|im_end|>` -> `<`, `|`, `im`, ...), no special tokens added; releases the GIL too."""
        return [e.ids for e in self._plain_backend.encode_batch(texts, add_special_tokens=False)]

    @cached_property
    def _plain_backend(self) -> BackendTokenizer:
        # `encode_special_tokens` is a setting of the whole tokenizer: a copy carries it.
        plain = BackendTokenizer.from_str(self.backend.to_str())
        plain.encode_special_tokens = True
        return plain

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        """Vocabulary pieces as stored (byte-level BPE: `Ġworld`), like transformers."""
        pieces = self._id_to_piece
        return [pieces[i] if 0 <= i < len(pieces) else "" for i in ids]

    def id_to_token(self, token_id: int) -> str:
        """Decoded text of one token (` world`), for logprobs; partial UTF-8 shows as U+FFFD."""
        return self._token_text(token_id)

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes of one token (OpenAI logprobs `bytes`)."""
        piece = self.convert_ids_to_tokens([token_id])[0]
        if token_id in self._added_ids:
            return piece.encode("utf-8")
        if self._byte_level:
            unicode_to_byte = _unicode_to_byte()
            if all(c in unicode_to_byte for c in piece):
                return bytes(unicode_to_byte[c] for c in piece)
        if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:  # sentencepiece byte fallback
            return bytes([int(piece[3:5], 16)])
        return self._token_text(token_id).encode("utf-8")

    def _token_text(self, token_id: int) -> str:
        return self.backend.decode([token_id], skip_special_tokens=False)

    # ---- chat ----

    def save(self, folder: str) -> None:
        """Write an HF-style tokenizer folder (tokenizer.json, tokenizer_config.json) that
        `tokenizer_from_hf_folder` reads back: e.g. to carry a GGUF's tokenizer elsewhere."""
        os.makedirs(folder, exist_ok=True)
        self.backend.save(os.path.join(folder, "tokenizer.json"))
        config = {"bos_token": self.bos_token, "eos_token": self.eos_token, "chat_template": self.chat_template}
        with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, ensure_ascii=False, indent=1)
        with open(os.path.join(folder, "generation_config.json"), "w", encoding="utf-8") as f:
            json.dump({"eos_token_id": sorted(self.eos_token_ids)}, f)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, tools=None,
                            chat_template: str | None = None, **kwargs) -> str:
        """Render a conversation with the model's Jinja chat template (as transformers does)."""
        template = chat_template or self.chat_template
        if template is None:
            raise ValueError("this model has no chat template; send a completion prompt instead")
        variables = {**self._template_vars, **kwargs}
        return _compile_template(template).render(messages=messages, tools=tools,
                                                  add_generation_prompt=add_generation_prompt, **variables)


def load_chat_template(value: str) -> str:
    """A chat template given as a file or as the Jinja text itself (vLLM's `--chat-template`),
    compiled once to check it; ValueError when it is neither or does not compile."""
    path = os.path.expanduser(value)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            template = f.read()
    elif "{{" in value or "{%" in value:
        template = value
    else:
        raise ValueError(f"chat template {value!r} is neither a file nor a Jinja template")
    try:
        _compile_template(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(f"chat template {value[:80]!r} does not compile: {exc}") from None
    return template


def with_chat_template(tokenizer, value: str):
    """A copy of `tokenizer` that renders chats with the template `value` (`load_chat_template`)."""
    templated = copy.copy(tokenizer)
    templated.chat_template = load_chat_template(value)
    return templated


def _vocab_list(backend: BackendTokenizer, size: int) -> list[str]:
    pieces = [""] * size
    for piece, token_id in backend.get_vocab(with_added_tokens=True).items():
        if token_id < size:
            pieces[token_id] = piece
    return pieces


@lru_cache(maxsize=1)
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte as a printable character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in _byte_to_unicode().items()}


# ---- chat templates ----

class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask markers): passthrough."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson escapes HTML characters, which chat templates must not do.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=1)
def _template_environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


@lru_cache(maxsize=16)
def _compile_template(template: str) -> jinja2.Template:
    return _template_environment().from_string(template)


def parse_template(template: str) -> jinja2.nodes.Template:
    """A chat template's syntax tree (parsed as `apply_chat_template` parses it), for callers that
    ask what a template reads (`tools`, `tool_calls`, ...) rather than render it."""
    return _template_environment().parse(template)


# ---- loading ----

def load_tokenizer(model: str | None, tokenizer: str | None = None) -> Tokenizer:
    """The tokenizer of `ModelConfig.model`: GGUF metadata, HF folder files, or (for `dummy:*`
    models, which have none) the embedded SmolLM2 tokenizer. `tokenizer` (a folder with
    tokenizer.json, or a .gguf file) overrides the model's own."""
    if tokenizer is not None:
        if os.path.isdir(tokenizer):
            return tokenizer_from_hf_folder(tokenizer)
        return tokenizer_from_gguf(tokenizer)
    source = resolve_model_source(model)
    if source.kind == "hf":
        return tokenizer_from_hf_folder(source.path)
    path = source.path if source.kind == "gguf" else embedded_gguf_path()
    return tokenizer_from_gguf(path)


def _read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_content(token) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as AddedToken dicts."""
    return token.get("content") if isinstance(token, dict) else token


def _hf_chat_template(folder: str, tokenizer_config: dict) -> str | None:
    jinja_path = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            return f.read()
    template = (_read_json(os.path.join(folder, "chat_template.json")) or {}).get("chat_template")
    template = template or tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    return template


def tokenizer_from_hf_folder(folder: str) -> Tokenizer:
    """tokenizer.json + tokenizer_config.json (+ chat template files, generation_config.json)."""
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        raise ValueError(f"{folder} has no tokenizer.json (slow-tokenizer-only models are not supported)")
    backend = BackendTokenizer.from_file(path)
    config = _read_json(os.path.join(folder, "tokenizer_config.json")) or {}
    eos_ids: set[int] = set()
    for extra in (_read_json(os.path.join(folder, "generation_config.json")),
                  _read_json(os.path.join(folder, "config.json"))):
        value = (extra or {}).get("eos_token_id")
        eos_ids |= set(value if isinstance(value, list) else [value] if value is not None else [])
    extras = {k: _token_content(config.get(k)) or "" for k in ("unk_token", "pad_token")}
    return Tokenizer(backend, bos_token=_token_content(config.get("bos_token")),
                     eos_token=_token_content(config.get("eos_token")), eos_token_ids=eos_ids,
                     chat_template=_hf_chat_template(folder, config), extra_template_vars=extras)


def tokenizer_from_gguf(path: str) -> Tokenizer:
    """Byte-level BPE (`tokenizer.ggml.model == "gpt2"`) from a GGUF file's metadata."""
    reader = GGUFFile(path)
    kind = reader.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2')")
    tokens = reader.get("tokenizer.ggml.tokens")
    token_types = reader.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = reader.get("tokenizer.ggml.merges") or []
    backend = build_byte_level_bpe(tokens, token_types, merges, reader.get("tokenizer.ggml.pre"))

    def token(key: str) -> str | None:
        token_id = reader.get(f"tokenizer.ggml.{key}")
        return tokens[token_id] if token_id is not None and token_id < len(tokens) else None

    bos = token("bos_token_id")
    if reader.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokens.index(bos))])
    eos_ids = {reader.get(f"tokenizer.ggml.{k}") for k in ("eos_token_id", "eot_token_id", "eom_token_id")}
    return Tokenizer(backend, bos_token=bos, eos_token=token("eos_token_id"), eos_token_ids=eos_ids - {None},
                     chat_template=reader.get("tokenizer.chat_template"),
                     extra_template_vars={"unk_token": token("unknown_token_id") or "",
                                          "pad_token": token("padding_token_id") or ""})


# Pre-tokenizer split patterns by `tokenizer.ggml.pre` (the public regexes of each model family).
_LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                   r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLIT_PATTERNS = {"llama3": _LLAMA3_PATTERN, "llama-v3": _LLAMA3_PATTERN, "llama-bpe": _LLAMA3_PATTERN,
                   "smaug-bpe": _LLAMA3_PATTERN, "qwen2": _QWEN2_PATTERN, "deepseek-r1-qwen": _QWEN2_PATTERN}
_IGNORE_MERGES = {"llama3", "llama-v3", "llama-bpe", "smaug-bpe"}  # Llama 3 looks whole words up first
_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED = 3, 4


def _pre_tokenizer(pre: str | None):
    if pre in _SPLIT_PATTERNS:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLIT_PATTERNS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2's split
    if pre == "smollm":  # SmolLM splits every digit off first
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return byte_level


def build_byte_level_bpe(tokens: list[str], token_types: list[int], merges: list[str],
                         pre: str | None) -> BackendTokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` from GGUF vocabulary lists.

    Control tokens (`<|im_end|>`) become special added tokens and user-defined ones (`<think>`)
    plain added tokens, so both match whole in text, as in llama.cpp.
    """
    vocab = {token: index for index, token in enumerate(tokens)}
    pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    backend = BackendTokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre in _IGNORE_MERGES))
    backend.pre_tokenizer = _pre_tokenizer(pre)
    backend.decoder = decoders.ByteLevel()
    special = [AddedToken(t, special=True, normalized=False)
               for t, kind in zip(tokens, token_types) if kind == _TOKEN_TYPE_CONTROL]
    user = [AddedToken(t, special=False, normalized=False)
            for t, kind in zip(tokens, token_types) if kind == _TOKEN_TYPE_USER_DEFINED]
    backend.add_special_tokens(special)
    backend.add_tokens(user)
    return backend
