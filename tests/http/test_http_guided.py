"""Constrained decoding over HTTP (checklist items 11-13 of shared/notes/ecosystem.md §6): TGI's
`grammar`, OpenAI's `response_format`; bad or costly grammars get a 422 or a bounded answer,
and the server keeps serving."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx
import jsonschema

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0,
                                                   "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
PROMPT = "Describe a person as JSON:"


def generate(url: str, grammar: dict, max_new_tokens: int = 80, **params: object
             ) -> httpx.Response:
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": max_new_tokens, "details": True,
                                             "grammar": grammar, **params}}
    return httpx.post(f"{url}/generate", json=body, timeout=120)


def error_of(r: httpx.Response) -> str:
    assert r.status_code == 422, (r.status_code, r.text)
    body = r.json()
    err = body["error"]
    return err["message"] if isinstance(err, dict) else err


def still_serving(url: str) -> None:
    r = httpx.post(f"{url}/generate", timeout=60,
                   json={"inputs": "The capital of France is", "parameters": {"max_new_tokens": 3}})
    assert r.status_code == 200 and r.json()["generated_text"]


def test_tgi_json_regex_and_lark(server) -> None:
    for grammar in ({"type": "json", "value": PERSON},
                    {"type": "json", "value": json.dumps(PERSON)},
                    {"type": "json_schema", "value": {"name": "person", "schema": PERSON}}):
        r = generate(server.url, grammar)
        assert r.status_code == 200, r.text
        body = r.json()
        jsonschema.validate(json.loads(body["generated_text"]), PERSON)
        assert body["details"]["finish_reason"] == "eos_token"
    r = generate(server.url, {"type": "regex", "value": r"[0-9]{3}-[A-Z]{2}"})
    assert re.fullmatch(r"[0-9]{3}-[A-Z]{2}", r.json()["generated_text"])
    r = generate(server.url, {"type": "lark", "value": 'start: "yes" | "no"'})
    assert r.json()["generated_text"] in ("yes", "no")
    r = generate(server.url, {"type": "json_object"}, max_new_tokens=60)
    assert r.status_code == 200 and r.json()["generated_text"].startswith("{")


def test_tgi_stream_with_grammar(server) -> None:
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 80, "grammar": {
        "type": "json", "value": PERSON}}}
    final = None
    with httpx.stream("POST", f"{server.url}/generate_stream", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                event = json.loads(line[5:])
                final = event.get("generated_text") or final
    assert final is not None
    jsonschema.validate(json.loads(final), PERSON)


def test_invalid_grammars_are_422_with_the_compiler_message(server) -> None:
    cases = [
        ({"type": "json", "value": {"type": "foo"}}, "Invalid type"),
        ({"type": "json", "value": "{not json"}, "not valid JSON"),
        ({"type": "json", "value": {"type": "array", "uniqueItems": True}}, "uniqueItems"),
        ({"type": "regex", "value": "a(b"}, "unclosed group"),
        ({"type": "lark", "value": "start: foo"}, "unknown name"),
        ({"type": "xml", "value": "<a/>"}, "`type` must be one of"),
        ({"type": "regex", "value": 5}, "must be a string"),
    ]
    for grammar, needle in cases:
        msg = error_of(generate(server.url, grammar))
        assert msg.startswith("Input validation error: grammar is not valid: "), msg
        assert needle in msg, msg
    still_serving(server.url)


def test_costly_schemas_are_refused_or_bounded(server) -> None:
    deep: dict = {"type": "string"}
    for _ in range(200):
        deep = {"type": "object", "properties": {"a": deep}, "required": ["a"]}
    big_enum = {"type": "string", "enum": [f"value{i}" for i in range(10_000)]}
    assert "recursion limit" in error_of(generate(server.url, {"type": "json", "value": deep}))
    assert "too large" in error_of(generate(server.url, {"type": "json", "value": big_enum}))
    # Any value / any object under temperature 2.0, and a 10,000-value enum that fits the cap
    # (~49 KB): bounded by max_new_tokens, and valid whenever the grammar ended the answer.
    schemas = [{}, {"type": "object"}, {"enum": list(range(10_000))}]

    def run(schema: dict) -> httpx.Response:
        return generate(server.url, {"type": "json", "value": schema}, max_new_tokens=48,
                        do_sample=True, temperature=2.0, seed=11)

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(run, s) for s in schemas]
        still_serving(server.url)  # while they decode
        for schema, f in zip(schemas, futures):
            r = f.result()
            assert r.status_code == 200, r.text
            d = r.json()["details"]
            assert d["generated_tokens"] <= 48
            if d["finish_reason"] == "eos_token":
                jsonschema.validate(json.loads(r.json()["generated_text"]), schema)
            else:
                assert d["finish_reason"] == "length" and d["generated_tokens"] == 48
    still_serving(server.url)


def test_endless_whitespace_stops_at_max_new_tokens(server) -> None:
    grammar = {"type": "regex", "value": r"[ \t\n]*(abcdefghij){40}"}
    for params in ({}, {"do_sample": True, "temperature": 2.0, "seed": 3}):
        d = generate(server.url, grammar, max_new_tokens=24, **params).json()["details"]
        assert d["finish_reason"] == "length" and d["generated_tokens"] == 24
    still_serving(server.url)


def test_openai_response_format(server) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    messages = [{"role": "user", "content": f"Give a person as JSON matching {PERSON}"}]
    r = client.chat.completions.create(
        model="tgi", messages=messages, max_tokens=80, temperature=0,
        response_format={"type": "json_schema", "json_schema": {
            "name": "person", "schema": PERSON, "strict": True}})
    jsonschema.validate(json.loads(r.choices[0].message.content or ""), PERSON)
    assert r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model="tgi", messages=messages, max_tokens=60,
                                       temperature=0, response_format={"type": "json_object"})
    content = r.choices[0].message.content or ""
    assert content.startswith("{")
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)
    r = client.chat.completions.create(model="tgi", messages=messages, max_tokens=8,
                                       temperature=0, response_format={"type": "text"})
    assert r.choices[0].message.content
    # TGI's form on the chat route, and vLLM's on completions.
    tgi_form = httpx.post(f"{server.url}/v1/chat/completions", timeout=120, json={
        "messages": messages, "max_tokens": 20, "temperature": 0,
        "response_format": {"type": "regex", "value": "(yes|no)"}}).json()
    assert tgi_form["choices"][0]["message"]["content"] in ("yes", "no")
    c = client.completions.create(model="tgi", prompt=PROMPT, max_tokens=80, temperature=0,
                                  extra_body={"response_format": {"type": "json_schema",
                                                                  "json_schema": {
                                                                      "name": "p",
                                                                      "schema": PERSON}}})
    jsonschema.validate(json.loads(c.choices[0].text), PERSON)
    with_bad = httpx.post(f"{server.url}/v1/chat/completions", timeout=60, json={
        "messages": messages, "response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "nope"}}}})
    assert with_bad.status_code == 422 and "Invalid type" in with_bad.text
