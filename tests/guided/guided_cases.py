"""JSON Schemas and regexes for the constrained-generation tests: each bounds its output (maxLength,
maxItems, enums, patterns, additionalProperties false), so a run ends because the grammar is
complete, well within the token budget, whatever the model samples."""

from __future__ import annotations

from typing import Any

NAME = {"type": "string", "maxLength": 12}

SCHEMAS: list[tuple[str, dict[str, Any]]] = [
    ("a person", {"type": "object", "properties": {"name": NAME, "age": {
        "type": "integer", "minimum": 0, "maximum": 120}}, "required": ["name", "age"],
        "additionalProperties": False}),
    ("a yes/no answer to: is the sky blue?", {"type": "object", "properties": {
        "answer": {"type": "boolean"}}, "required": ["answer"], "additionalProperties": False}),
    ("a colour", {"type": "object", "properties": {"color": {
        "enum": ["red", "green", "blue", "yellow"]}}, "required": ["color"],
        "additionalProperties": False}),
    ("three small numbers", {"type": "array", "items": {
        "type": "integer", "minimum": 0, "maximum": 99}, "minItems": 3, "maxItems": 3}),
    ("a shopping list", {"type": "object", "properties": {"items": {
        "type": "array", "items": {"type": "string", "maxLength": 10}, "minItems": 1,
        "maxItems": 4}}, "required": ["items"], "additionalProperties": False}),
    ("a product code", {"type": "object", "properties": {"code": {
        "type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"}}, "required": ["code"],
        "additionalProperties": False}),
    ("a point", {"type": "object", "properties": {"x": {
        "type": "integer", "minimum": -50, "maximum": 50}, "y": {
        "type": "integer", "minimum": -50, "maximum": 50}}, "required": ["x", "y"],
        "additionalProperties": False}),
    ("a city with its country", {"type": "object", "properties": {"city": NAME, "country": {
        "type": "object", "properties": {"name": NAME, "code": {
            "type": "string", "pattern": "^[A-Z]{2}$"}}, "required": ["name", "code"],
        "additionalProperties": False}}, "required": ["city", "country"],
        "additionalProperties": False}),
    ("an id that is a number or a string", {"type": "object", "properties": {"id": {
        "anyOf": [{"type": "integer", "minimum": 0, "maximum": 9999}, {
            "type": "string", "maxLength": 8}]}}, "required": ["id"],
        "additionalProperties": False}),
    ("two people", {"$defs": {"person": {"type": "object", "properties": {
        "name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"], "additionalProperties": False}}, "type": "object",
        "properties": {"a": {"$ref": "#/$defs/person"}, "b": {"$ref": "#/$defs/person"}},
        "required": ["a", "b"], "additionalProperties": False}),
    ("a temperature", {"type": "object", "properties": {"celsius": {
        "type": "number", "minimum": -40, "maximum": 50}}, "required": ["celsius"],
        "additionalProperties": False}),
    ("a status", {"type": "object", "properties": {"status": {"const": "ok"}, "count": {
        "type": "integer", "minimum": 0, "maximum": 10}}, "required": ["status", "count"],
        "additionalProperties": False}),
    ("an email-like contact", {"type": "object", "properties": {"email": {
        "type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.(com|org)$"}},
        "required": ["email"], "additionalProperties": False}),
    ("a date", {"type": "object", "properties": {"date": {
        "type": "string", "pattern": "^20[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9])$"}},
        "required": ["date"], "additionalProperties": False}),
    ("a grid of 0s and 1s", {"type": "array", "items": {"type": "array", "items": {
        "enum": [0, 1]}, "minItems": 2, "maxItems": 2}, "minItems": 2, "maxItems": 2}),
    ("a book with optional subtitle", {"type": "object", "properties": {"title": NAME,
        "subtitle": NAME, "pages": {"type": "integer", "minimum": 1, "maximum": 999}},
        "required": ["title", "pages"], "additionalProperties": False}),
    ("a nullable note", {"type": "object", "properties": {"note": {
        "type": ["string", "null"], "maxLength": 10}}, "required": ["note"],
        "additionalProperties": False}),
    ("a rating", {"type": "object", "properties": {"stars": {
        "type": "integer", "minimum": 1, "maximum": 5}, "comment": {
        "type": "string", "minLength": 1, "maxLength": 15}}, "required": ["stars", "comment"],
        "additionalProperties": False}),
    ("a list of tags", {"type": "array", "items": {"enum": ["news", "tech", "sport", "art"]},
        "minItems": 1, "maxItems": 3}),
    ("a shape", {"oneOf": [{"type": "object", "properties": {"kind": {"const": "circle"},
        "r": {"type": "integer", "minimum": 1, "maximum": 9}}, "required": ["kind", "r"],
        "additionalProperties": False}, {"type": "object", "properties": {
        "kind": {"const": "square"}, "side": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["kind", "side"], "additionalProperties": False}]}),
    ("an order", {"type": "object", "properties": {"order_id": {"type": "integer",
        "minimum": 1, "maximum": 99999}, "lines": {"type": "array", "items": {
            "type": "object", "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}$"},
                                             "qty": {"type": "integer", "minimum": 1,
                                                     "maximum": 9}},
            "required": ["sku", "qty"], "additionalProperties": False}, "minItems": 1,
        "maxItems": 2}}, "required": ["order_id", "lines"], "additionalProperties": False}),
    ("a flag", {"type": "boolean"}),
    ("a word", {"type": "string", "pattern": "^[a-z]{2,10}$"}),
]

REGEXES: list[tuple[str, str]] = [
    ("Is water wet? Answer yes or no with a reason.", r"(yes|no), because [a-z ]{5,30}\."),
    ("Give a phone number.", r"\+1 [0-9]{3}-[0-9]{3}-[0-9]{4}"),
    ("Name a fruit.", r"(apple|banana|cherry|grape)"),
    ("What time is it?", r"([01][0-9]|2[0-3]):[0-5][0-9]"),
]
