"""TGI's `grammar` and OpenAI's `response_format` → GrammarSpec, and their wiring into the
TGI, chat and completions validators (no server, no model)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tokenmill.protocol import GrammarSpec
from tokenmill.server import schemas as S
from tokenmill.server.errors import InputValidationError
from tokenmill.server.grammar import response_format_grammar, tgi_grammar
from tokenmill.server.validation import (
    Limits,
    validate_chat,
    validate_completion,
    validate_generate,
)

LIMITS = Limits(max_input_tokens=100, max_total_tokens=128, vocab_size=1000)
SCHEMA = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}
COMPACT = '{"type":"object","properties":{"b":{"type":"integer"},"a":{"type":"string"}}}'


def message(fn: Any, arg: Any) -> str:
    with pytest.raises(InputValidationError) as e:
        fn(arg)
    msg = e.value.message
    assert msg.startswith("Input validation error: grammar is not valid: "), msg
    return msg.removeprefix("Input validation error: grammar is not valid: ")


@pytest.mark.parametrize(("grammar", "spec"), [
    (None, None),
    ({"type": "json", "value": SCHEMA}, GrammarSpec(kind="json", value=COMPACT)),  # order kept
    ({"type": "json", "value": json.dumps(SCHEMA)},
     GrammarSpec(kind="json", value=json.dumps(SCHEMA))),
    ({"type": "json_object", "value": SCHEMA}, GrammarSpec(kind="json", value=COMPACT)),
    ({"type": "json_object"}, GrammarSpec(kind="json_object")),
    ({"type": "json_schema", "value": {"name": "x", "schema": SCHEMA}},
     GrammarSpec(kind="json", value=COMPACT)),
    ({"type": "regex", "value": "[a-z]+"}, GrammarSpec(kind="regex", value="[a-z]+")),
    ({"type": "lark", "value": 'start: "a"'}, GrammarSpec(kind="lark", value='start: "a"')),
])
def test_tgi_grammar_shapes(grammar: dict[str, Any] | None, spec: GrammarSpec | None) -> None:
    assert tgi_grammar(grammar) == spec


@pytest.mark.parametrize(("grammar", "needle"), [
    ({"type": "json"}, "`value` must hold a JSON Schema"),
    ({"type": "json", "value": [1]}, "must be an object or a boolean"),
    ({"type": "json", "value": {"type": "foo"}}, "Invalid type"),
    ({"type": "json_schema", "value": {"name": "x"}}, "`value` must be"),
    ({"type": "regex", "value": ["a"]}, "must be a string"),
    ({"type": "regex", "value": "("}, "unclosed group"),
    ({"type": "lark", "value": "start: nope"}, "unknown name"),
    ({"value": "x"}, "`type` must be one of"),
    ({"type": "json", "value": {"enum": ["x" * 100] * 700}}, "too large"),
])
def test_tgi_grammar_errors(grammar: dict[str, Any], needle: str) -> None:
    assert needle in message(tgi_grammar, grammar)


@pytest.mark.parametrize(("fmt", "spec"), [
    (None, None),
    ({"type": "text"}, None),
    ({}, None),
    ({"type": "json_object"}, GrammarSpec(kind="json_object")),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}},
     GrammarSpec(kind="json", value=COMPACT)),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, GrammarSpec(kind="json_object")),
    ({"type": "json", "value": SCHEMA}, GrammarSpec(kind="json", value=COMPACT)),  # TGI's form
    ({"type": "regex", "value": "x"}, GrammarSpec(kind="regex", value="x")),
])
def test_response_format_shapes(fmt: dict[str, Any] | None, spec: GrammarSpec | None) -> None:
    assert response_format_grammar(fmt) == spec


def test_response_format_errors() -> None:
    assert "`json_schema` must be" in message(response_format_grammar, {"type": "json_schema"})
    assert "Given: 'yaml'" in message(response_format_grammar, {"type": "yaml"})
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 3}}}
    assert message(response_format_grammar, bad)


def test_validators_carry_the_grammar() -> None:
    grammar = {"type": "regex", "value": "(yes|no)"}
    req = S.GenerateRequest.model_validate({"inputs": "Hi", "parameters": {"grammar": grammar}})
    _, params, _ = validate_generate(req, [1, 2], LIMITS, stream=False)
    assert params.grammar == GrammarSpec(kind="regex", value="(yes|no)")
    chat = S.ChatCompletionRequest.model_validate({
        "messages": [{"role": "user", "content": "Hi"}],
        "response_format": {"type": "json_object"}})
    assert validate_chat(chat, [1, 2], LIMITS)[0].grammar == GrammarSpec(kind="json_object")
    comp = S.CompletionRequest.model_validate({"prompt": "Hi", "response_format": {
        "type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMA}}})
    assert validate_completion(comp, LIMITS)[1].grammar == GrammarSpec(kind="json", value=COMPACT)
    plain = S.ChatCompletionRequest.model_validate({"messages": [{"role": "user",
                                                                  "content": "Hi"}]})
    assert validate_chat(plain, [1, 2], LIMITS)[0].grammar is None
