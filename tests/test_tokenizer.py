"""Tokenizer tests: ours against transformers on the embedded GGUF and on a Hugging Face folder."""

from __future__ import annotations

import json
import os

import pytest

from tidal.models.source import embedded_gguf_path
from tidal.tokenizer import Tokenizer, load_tokenizer, tokenizer_from_gguf

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello world",
    "  leading spaces and trailing   ",
    "Numbers: 1234567890, 3.14159, -42, 1e10, 2024-11-27",
    "Unicode: café, naïve, Ελληνικά, русский, 日本語のテキスト, 한국어, emoji 😀🎉👍🏽",
    "def f(x):\n\treturn x ** 2  # square\n\n\nprint(f(3))",
    "<|im_start|>user\nWhat's up?<|im_end|>\n<|im_start|>assistant\n",
    "don't won't it's we'll I'm you're they've",
    "tabs\tand\nnewlines\r\nand\u00a0nbsp\u3000ideographic space",
    "<|endoftext|>special in the middle<|im_end|>",
    "",
    "   ",
    "a" * 50,
    "https://example.com/path?q=1&r=two#frag",
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"}],
    [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi! How can I help?"},
     {"role": "user", "content": "Tell me a joke about 😀."}],
]


@pytest.fixture(scope="module")
def ours() -> Tokenizer:
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def theirs():
    path = embedded_gguf_path()
    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


def test_encode_matches_transformers(ours, theirs):
    for text in TEXTS:
        assert ours.encode(text) == theirs.encode(text), text
        assert ours.encode(text, add_special_tokens=False) == theirs.encode(text, add_special_tokens=False)


def test_decode_matches_transformers(ours, theirs):
    for text in TEXTS:
        ids = theirs.encode(text)
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text
        assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids), text
        assert ours.convert_ids_to_tokens(ids) == theirs.convert_ids_to_tokens(ids)


def test_chat_template_matches_transformers(ours, theirs):
    for messages in CONVERSATIONS:
        for add_generation_prompt in (True, False):
            expected = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
            assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected


def test_special_tokens(ours, theirs):
    assert ours.vocab_size == len(theirs) == 49152
    assert ours.bos_token_id == theirs.bos_token_id == 1
    assert ours.eos_token_id == theirs.eos_token_id == 2  # <|im_end|>
    assert {0, 2} <= ours.eos_token_ids  # <|endoftext|> ends generation too
    assert set(ours.all_special_ids) == set(theirs.all_special_ids) | set(range(17))
    assert ours.chat_template == theirs.chat_template


def test_token_text_and_bytes(ours):
    world = ours.encode(" world", add_special_tokens=False)
    assert len(world) == 1
    assert ours.id_to_token(world[0]) == " world"
    assert ours.convert_ids_to_tokens(world) == ["Ġworld"]
    assert ours.token_bytes(world[0]) == b" world"
    assert ours.token_bytes(2) == b"<|im_end|>"
    # An emoji split over byte tokens: each token's bytes join to the UTF-8 encoding.
    ids = ours.encode("😀", add_special_tokens=False)
    assert b"".join(ours.token_bytes(i) for i in ids) == "😀".encode()


def test_chat_template_features(ours):
    template = ("{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}\n{% endfor %}"
                "{% if tools %}{{ tools | tojson }}{% endif %}{{ bos_token }}{{ custom }}"
                "{% if messages | length > 2 %}{{ raise_exception('too long') }}{% endif %}")
    text = ours.apply_chat_template([{"role": "user", "content": "é"}], tools=[{"name": "f"}],
                                    chat_template=template, custom="!")
    assert text == 'USER: é\n[{"name": "f"}]<|im_start|>!'
    with pytest.raises(Exception, match="too long"):
        ours.apply_chat_template([{"role": "user", "content": "x"}] * 3, chat_template=template)
    with pytest.raises(Exception):  # sandboxed: no attribute escapes
        ours.apply_chat_template([], chat_template="{{ messages.__class__.__mro__ }}")


def test_dummy_models_use_embedded_tokenizer(ours):
    assert load_tokenizer("dummy:tiny-llama").encode("Hello") == ours.encode("Hello")


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, ours):
    """An HF tokenizer folder: our tokenizer.json, a config with a Llama-3-style chat template."""
    folder = tmp_path_factory.mktemp("hf_tokenizer")
    ours.backend.save(str(folder / "tokenizer.json"))
    template = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
                "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    config = {"bos_token": {"__type": "AddedToken", "content": "<|im_start|>", "special": True}, "eos_token": "<|im_end|>",
              "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "chat_template": template,
              "tokenizer_class": "PreTrainedTokenizerFast"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    return folder


def test_hf_folder_tokenizer_matches_transformers(hf_folder):
    ours = load_tokenizer(str(hf_folder))
    theirs = transformers.AutoTokenizer.from_pretrained(str(hf_folder))
    for text in TEXTS:
        assert ours.encode(text) == theirs.encode(text), text
        assert ours.decode(theirs.encode(text)) == theirs.decode(theirs.encode(text), skip_special_tokens=True)
    for messages in CONVERSATIONS:
        assert ours.apply_chat_template(messages) == theirs.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True)
    assert ours.bos_token_id == 1 and ours.eos_token_id == 2
    assert {2, 5} <= ours.eos_token_ids


def test_hf_folder_chat_template_file_wins(hf_folder, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((hf_folder / name).read_bytes())
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0].content }}!")
    assert load_tokenizer(str(tmp_path)).apply_chat_template([{"role": "user", "content": "x"}]) == "x!"


def test_gguf_tokenizer_without_chat_template_raises(ours):
    bare = Tokenizer(ours.backend)
    with pytest.raises(ValueError, match="chat template"):
        bare.apply_chat_template([{"role": "user", "content": "x"}])


def test_gguf_tokenizer_direct():
    assert tokenizer_from_gguf(embedded_gguf_path()).encode("Hi") == load_tokenizer(None).encode("Hi")


def test_save_and_reload_round_trip(tmp_path):
    from tidal.tokenizer import load_tokenizer

    original = load_tokenizer(None)
    original.save(str(tmp_path / "tok"))
    copy = load_tokenizer("dummy:tiny-llama", tokenizer=str(tmp_path / "tok"))
    text = "Hello wörld 123 <|im_start|>user\nhi<|im_end|>"
    assert copy.encode(text) == original.encode(text)
    assert copy.eos_token_ids == original.eos_token_ids
    messages = [{"role": "user", "content": "What is 2+2?"}]
    assert copy.apply_chat_template(messages) == original.apply_chat_template(messages)
