"""Request grammars → `GrammarSpec`: TGI's ``parameters.grammar`` and OpenAI's
``response_format``, compiled here (422 with the compiler's message) before anything is queued.

Accepted shapes:

* TGI ``grammar`` (and TGI-style ``response_format`` with a ``value`` key):
  ``{"type": "json", "value": <JSON Schema object, or its JSON text>}`` (``json_object`` is
  TGI's alias; without a value it means any JSON object), ``{"type": "json_schema", "value":
  {"name": ..., "schema": {...}}}``, ``{"type": "regex", "value": "..."}`` (the whole output
  matches) and ``{"type": "lark", "value": "..."}`` (an extension: a llguidance Lark grammar).
  Unlike TGI we do not require a ``properties`` key: any schema llguidance compiles is fine.
* OpenAI ``response_format``: ``{"type": "text"}`` (no constraint), ``{"type":
  "json_object"}``, ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``
  (``strict`` is accepted and ignored: the schema is always enforced; a missing ``schema``
  means any JSON object).
"""

from __future__ import annotations

import json
from typing import Any

from tokenmill.guided import GrammarError, check_grammar
from tokenmill.protocol import GrammarSpec
from tokenmill.server.errors import InputValidationError

__all__ = ["response_format_grammar", "tgi_grammar"]

_TGI_TYPES = "json, json_object, json_schema, regex or lark"


def _invalid(message: str) -> InputValidationError:
    return InputValidationError(f"grammar is not valid: {message}")


def _schema_text(schema: Any) -> str:
    """A JSON Schema given as an object (or as its JSON text) → compact JSON text. Key order
    is kept: it is the order of the generated object's properties."""
    if isinstance(schema, str):
        return schema
    if not isinstance(schema, (dict, bool)):
        raise _invalid("the JSON Schema must be an object or a boolean")
    try:
        return json.dumps(schema, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (ValueError, RecursionError) as e:
        raise _invalid(f"the JSON Schema cannot be serialized: {e}") from None


def _compiled(spec: GrammarSpec) -> GrammarSpec:
    try:
        check_grammar(spec)
    except GrammarError as e:
        raise _invalid(str(e)) from None
    return spec


def tgi_grammar(grammar: dict[str, Any] | None) -> GrammarSpec | None:
    """TGI's ``{type, value}`` grammar → a compiled-checked spec (None: no grammar)."""
    if grammar is None:
        return None
    kind, value = grammar.get("type"), grammar.get("value")
    if kind in ("json", "json_object"):
        if value is None:
            if kind == "json":
                raise _invalid("`value` must hold a JSON Schema")
            return _compiled(GrammarSpec(kind="json_object"))
        return _compiled(GrammarSpec(kind="json", value=_schema_text(value)))
    if kind == "json_schema":
        if not isinstance(value, dict) or "schema" not in value:
            raise _invalid("`value` must be {\"name\": ..., \"schema\": {...}}")
        return _compiled(GrammarSpec(kind="json", value=_schema_text(value["schema"])))
    if kind in ("regex", "lark"):
        if not isinstance(value, str):
            raise _invalid(f"`value` must be a string for a {kind} grammar")
        return _compiled(GrammarSpec(kind=kind, value=value))
    raise _invalid(f"`type` must be one of {_TGI_TYPES}. Given: {kind!r}")


def response_format_grammar(fmt: dict[str, Any] | None) -> GrammarSpec | None:
    """OpenAI's ``response_format`` (or TGI's ``{type, value}`` form) → spec (None: text)."""
    if fmt is None:
        return None
    kind = fmt.get("type", "text")
    if "value" in fmt:  # TGI's GrammarType, which its chat route takes as response_format
        return tgi_grammar(fmt)
    if kind == "text":
        return None
    if kind == "json_object":
        return _compiled(GrammarSpec(kind="json_object"))
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict):
            raise _invalid("`json_schema` must be {\"name\": ..., \"schema\": {...}}")
        if spec.get("schema") is None:
            return _compiled(GrammarSpec(kind="json_object"))
        return _compiled(GrammarSpec(kind="json", value=_schema_text(spec["schema"])))
    raise _invalid("`response_format.type` must be text, json_object or json_schema. "
                   f"Given: {kind!r}")
