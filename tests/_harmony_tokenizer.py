"""A tiny tokenizer in gpt-oss's harmony vocabulary and a harmony chat template, for tests.

gpt-oss's own tokenizer (o200k_harmony, 201k tokens) and chat template can't be shipped, so tests
train a byte-level BPE on a few harmony replies, with harmony's special tokens added, and render
chats with the template below (what gpt-oss's writes, much reduced: system with the reasoning
effort, developer tools, analysis/commentary/final messages, calls and their results).
"""

from __future__ import annotations

from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

HARMONY_SPECIALS = ["<|startoftext|>", "<|endoftext|>", "<|return|>", "<|constrain|>", "<|channel|>",
                    "<|start|>", "<|end|>", "<|message|>", "<|call|>"]
HARMONY_TEMPLATE = """\
{%- set ns = namespace(last_call="") -%}
<|start|>system<|message|>Reasoning: {{ reasoning_effort | default("medium") }}
# Valid channels: analysis, commentary, final.<|end|>
{%- if tools %}<|start|>developer<|message|># Tools
namespace functions {
{%- for tool in tools %}
// {{ tool.function.description | default("") }}
type {{ tool.function.name }} = (_: {{ tool.function.parameters | tojson }}) => any;
{%- endfor %}
} // namespace functions<|end|>{% endif -%}
{%- for m in messages -%}
{%- if m.role == "assistant" and m.tool_calls -%}
{%- set call = m.tool_calls[0].function -%}
{%- set ns.last_call = call.name -%}
{%- if m.thinking %}<|start|>assistant<|channel|>analysis<|message|>{{ m.thinking }}<|end|>{% endif -%}
<|start|>assistant to=functions.{{ call.name }}<|channel|>commentary json<|message|>
{{- call.arguments | tojson }}<|call|>
{%- elif m.role == "assistant" -%}
<|start|>assistant<|channel|>final<|message|>{{ m.content }}<|end|>
{%- elif m.role == "tool" -%}
<|start|>functions.{{ ns.last_call }} to=assistant<|channel|>commentary<|message|>{{ m.content }}<|end|>
{%- else -%}
<|start|>{{ m.role }}<|message|>{{ m.content }}<|end|>
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt %}<|start|>assistant{% endif -%}"""

THINK = "<|channel|>analysis<|message|>The user asks about Paris. Weather needs a tool.<|end|>"
CALL = ('<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>'
        '{"city": "Paris", "unit": "C"}<|call|>')
ANSWER = "<|start|>assistant<|channel|>final<|message|>It is 18C in Paris <sunny>.<|return|>"
THOUGHT = "The user asks about Paris. Weather needs a tool."


def harmony_backend(vocab_size: int = 400) -> BackendTokenizer:
    """A byte-level BPE trained on a few harmony replies, with harmony's special tokens (ids 0-8)."""
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, special_tokens=HARMONY_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([THINK + CALL + ANSWER, THOUGHT] * 5, trainer)
    return backend
