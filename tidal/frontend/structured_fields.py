"""The request fields that constrain the output to a grammar, and the `StructuredOutput` they make.

Accepted on chat and text completions alike:
- OpenAI's `response_format`: {"type": "text"} (no constraint), {"type": "json_object"} (any JSON
  object), {"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}};
- vLLM's `guided_json` (a schema, as an object or its text), `guided_regex`, `guided_choice` (a list
  of strings), `guided_grammar` (Lark or GBNF), and its newer `structured_outputs` object with one of
  `json`, `regex`, `choice`, `grammar`, `json_object`.
At most one constraint per request. Two checks make a schema the library refuses, a bad regex or
grammar, an empty choice list or two constraints at once a 400 naming the field before anything
reaches an engine, which enforces the constraint token by token:
- `check_structured_output` (awaited by the endpoints first) compiles the constraint over the
  server's tokenizer as the engine will (`tidal.grammar.GrammarCompiler`: one per tokenizer, built
  on first use; a new constraint compiles on a worker thread, a known one is a cache hit);
- `structured_output` (in `serving.build_sampling_params`) makes the `StructuredOutput`, with the
  library's tokenizer-free checks (cached), which is all a frontend without a real tokenizer has.
"""

from __future__ import annotations

import asyncio
import json
import threading
import weakref
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tidal.frontend.errors import bad_request
from tidal.grammar import GrammarCompiler, check
from tidal.protocol import StructuredOutput
from tidal.tokenizer import Tokenizer


class _Strict(BaseModel):
    """Nested options refuse fields they do not know: each one they take is enforced."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class JsonSchemaFormat(_Strict):
    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None  # the schema is enforced either way


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a 'json_schema' object")
        return self


class StructuredOutputsOptions(_Strict):
    """vLLM's `structured_outputs`: one of these."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class StructuredFields(BaseModel):
    """The fields, mixed into the request models (`openai_types.SamplingRequest`)."""

    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputsOptions | None = None


def structured_output(req: StructuredFields) -> StructuredOutput | None:
    """The request's one constraint (None: free text); `OpenAIError` 400 naming the field when the
    request has several, or one the grammar library's tokenizer-free checks refuse."""
    found = _one_constraint(req)
    if found is None:
        return None
    param, structured = found
    error = check(structured.kind, structured.spec)
    if error:
        raise _refused(param, structured, error)
    return structured


async def check_structured_output(tokenizer: Any, req: StructuredFields) -> None:
    """`OpenAIError` 400 naming the field unless the request's constraint compiles over `tokenizer`
    as it will in the engine (a tokenizer that is not a `Tokenizer`, a test double: nothing to do)."""
    found = _one_constraint(req)
    if found is None or not isinstance(tokenizer, Tokenizer):
        return
    param, structured = found
    compiler = _COMPILERS.get(tokenizer)
    if compiler is None:
        compiler = await asyncio.to_thread(_compiler, tokenizer)
    compiled = compiler.cached(structured)
    if compiled is None:
        compiled = await asyncio.to_thread(compiler.compile, structured)
    if isinstance(compiled, str):
        raise _refused(param, structured, compiled)


_COMPILERS: weakref.WeakKeyDictionary[Tokenizer, GrammarCompiler] = weakref.WeakKeyDictionary()
_COMPILERS_LOCK = threading.Lock()


def _compiler(tokenizer: Tokenizer) -> GrammarCompiler:
    """The tokenizer's compiler, built once (its vocabulary as the library sees it takes ~0.5 s)."""
    with _COMPILERS_LOCK:
        compiler = _COMPILERS.get(tokenizer)
        if compiler is None:
            compiler = _COMPILERS[tokenizer] = GrammarCompiler(tokenizer)
        return compiler


def _one_constraint(req: StructuredFields) -> tuple[str, StructuredOutput] | None:
    """(field name, constraint) of the request's one constraint; 400 for several or no choices."""
    found = [(param, structured) for param, structured in _constraints(req) if structured is not None]
    if not found:
        return None
    if len(found) > 1:
        names = ", ".join(param for param, _ in found)
        raise bad_request(f"Only one structured output constraint may be set per request; got {names}.",
                          param=found[1][0])
    param, structured = found[0]
    if structured.kind == "choice" and structured.spec == "[]":
        raise bad_request(f"{param} must list at least one choice.", param=param)
    return param, structured


def _refused(param: str, structured: StructuredOutput, reason: str):
    return bad_request(f"{param} is not a valid {_WHAT[structured.kind]}: {reason}", param=param)


_WHAT = {"json": "JSON schema", "json_object": "JSON object format", "regex": "regular expression",
         "choice": "list of choices", "grammar": "grammar (Lark or GBNF)"}


def _constraints(req: StructuredFields) -> list[tuple[str, StructuredOutput | None]]:
    """(field name, what it asks for) of every structured-output field of the request."""
    found = [("response_format", _response_format(req.response_format)),
             ("guided_json", _json(req.guided_json)),
             ("guided_regex", _plain("regex", req.guided_regex)),
             ("guided_choice", _choice(req.guided_choice)),
             ("guided_grammar", _plain("grammar", req.guided_grammar))]
    options = req.structured_outputs
    if options is not None:
        found += [("structured_outputs.json", _json(options.json_)),
                  ("structured_outputs.regex", _plain("regex", options.regex)),
                  ("structured_outputs.choice", _choice(options.choice)),
                  ("structured_outputs.grammar", _plain("grammar", options.grammar)),
                  ("structured_outputs.json_object",
                   StructuredOutput(kind="json_object") if options.json_object else None)]
    return found


def _response_format(fmt: ResponseFormat | None) -> StructuredOutput | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object" or fmt.json_schema is None or fmt.json_schema.schema_ is None:
        return StructuredOutput(kind="json_object")
    return StructuredOutput(kind="json", spec=json.dumps(fmt.json_schema.schema_))


def _json(schema: dict[str, Any] | str | None) -> StructuredOutput | None:
    if schema is None:
        return None
    return StructuredOutput(kind="json", spec=schema if isinstance(schema, str) else json.dumps(schema))


def _plain(kind: Literal["regex", "grammar"], spec: str | None) -> StructuredOutput | None:
    return None if spec is None else StructuredOutput(kind=kind, spec=spec)


def _choice(choices: list[str] | None) -> StructuredOutput | None:
    return None if choices is None else StructuredOutput(kind="choice", spec=json.dumps(choices))
