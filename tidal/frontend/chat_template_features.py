"""What a model's chat template does with tools and reasoning, read once from its source.

The serving side needs to know, before it renders a request, whether the template will show the
model the `tools` it is given (if not, `tool_calls.ToolPlan` writes them into a system prompt
itself rather than drop them), whether it renders the `tool_calls` of earlier assistant turns,
whether it reads `reasoning_effort`, and which tool-call format the model was trained on (the
markers its template writes). The variables come from the template's syntax tree, not from text
search, so a template that only mentions "tools" in a comment or a string is not taken to use them.
`TemplateFeatures.of` is cached per template text; the result is immutable.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jinja2
from jinja2 import meta, nodes

from tidal.frontend.harmony import is_harmony_template
from tidal.tokenizer import parse_template

LLAMA3_TOOL_MARKERS = ("<|python_tag|>", "respond with a JSON for a function call")
"""Text a Llama 3.x template writes when it prompts for JSON tool calls."""


@dataclass(frozen=True)
class TemplateFeatures:
    reads_tools: bool = False
    """The template reads the `tools` variable: it shows the model the tool definitions."""
    reads_tool_calls: bool = False
    """The template reads messages' `tool_calls`: earlier calls are rendered in the model's own format."""
    reads_reasoning_effort: bool = False
    """The template reads a `reasoning_effort` variable (so the request field can be honoured)."""
    tool_call_format: str = "hermes"
    """The output format its model calls tools in: `hermes` (<tool_call> tags: Qwen, Hermes, and
    what Tidal's own tool prompt asks for), `llama3_json` (Llama 3.x's bare JSON calls) or `harmony`
    (gpt-oss: its template writes `<|channel|>`; its whole reply is harmony messages)."""

    @staticmethod
    @functools.lru_cache(maxsize=16)
    def of(template: str | None) -> TemplateFeatures:
        if not template:
            return TemplateFeatures()
        try:
            tree = parse_template(template)
        except jinja2.TemplateError:
            return TemplateFeatures()  # rendering will report it, per request
        variables = meta.find_undeclared_variables(tree)
        return TemplateFeatures(reads_tools="tools" in variables,
                                reads_tool_calls=_reads_key(tree, "tool_calls"),
                                reads_reasoning_effort="reasoning_effort" in variables,
                                tool_call_format=_tool_call_format(template))


def _reads_key(tree: nodes.Template, key: str) -> bool:
    """Whether the template reads `x.key` or `x['key']` anywhere."""
    for node in tree.find_all((nodes.Getattr, nodes.Getitem)):
        if isinstance(node, nodes.Getattr) and node.attr == key:
            return True
        if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const) and node.arg.value == key:
            return True
    return False


def _tool_call_format(template: str) -> str:
    if is_harmony_template(template):
        return "harmony"
    if "<tool_call>" in template:
        return "hermes"
    if any(marker in template for marker in LLAMA3_TOOL_MARKERS):
        return "llama3_json"
    return "hermes"
