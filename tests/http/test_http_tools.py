"""Tool calling on /v1/chat/completions through the official openai client: `tools` with
`tool_choice` required / named / auto / none, streamed and not, a round trip with a `tool`
message, and the 422s of the bad-input checklist (items 14-15, ecosystem.md §6)."""

from __future__ import annotations

import json
from typing import Any

import httpx2 as httpx
import jsonschema
import pytest

WEATHER_PARAMS = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 30},
    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"]}
TIME_PARAMS = {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 30}},
               "required": ["timezone"]}
TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "get_weather", "description":
                                      "Get the current weather in a city",
                                      "parameters": WEATHER_PARAMS}},
    {"type": "function", "function": {"name": "get_time", "description":
                                      "Get the current time in a timezone",
                                      "parameters": TIME_PARAMS}},
]
PARAMS = {"get_weather": WEATHER_PARAMS, "get_time": TIME_PARAMS}
ASK: list[Any] = [{"role": "user", "content": "What is the weather like in Paris today?"}]


def client(server: Any) -> Any:
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")


def check_call(name: str, arguments: str) -> dict[str, Any]:
    args = json.loads(arguments)
    jsonschema.validate(args, PARAMS[name])
    return args


def test_required_and_named(server) -> None:
    c = client(server)
    r = c.chat.completions.create(model="tgi", messages=ASK, tools=TOOLS, tool_choice="required",
                                  parallel_tool_calls=False, temperature=0, max_tokens=96)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in PARAMS
    check_call(call.function.name, call.function.arguments)
    r = c.chat.completions.create(
        model="tgi", messages=ASK, tools=TOOLS, temperature=0, max_tokens=96,
        tool_choice={"type": "function", "function": {"name": "get_time"}})
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_time" and r.choices[0].finish_reason == "tool_calls"
    check_call("get_time", call.function.arguments)


def test_stream(server) -> None:
    c = client(server)
    stream = c.chat.completions.create(model="tgi", messages=ASK, tools=TOOLS,
                                       tool_choice="get_weather", temperature=0, max_tokens=96,
                                       stream=True, stream_options={"include_usage": True})
    # Accumulated the way the OpenAI docs show.
    calls: dict[int, dict[str, Any]] = {}
    roles, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        roles.append(delta.role)
        for tc in delta.tool_calls or []:
            entry = calls.setdefault(tc.index, {"id": tc.id, "name": "", "arguments": ""})
            entry["name"] += (tc.function and tc.function.name) or ""
            entry["arguments"] += (tc.function and tc.function.arguments) or ""
        finish = chunk.choices[0].finish_reason or finish
    assert roles[0] == "assistant" and finish == "tool_calls" and usage is not None
    assert list(calls) == [0] and calls[0]["id"].startswith("call_")
    assert calls[0]["name"] == "get_weather"
    check_call("get_weather", calls[0]["arguments"])
    # The SDK's stream helper accumulates the same deltas.
    with c.chat.completions.stream(model="tgi", messages=ASK, tools=TOOLS, temperature=0,
                                   tool_choice="required", max_tokens=128) as s:
        final = s.get_final_completion()
    msg = final.choices[0].message
    assert final.choices[0].finish_reason == "tool_calls" and msg.tool_calls
    for call in msg.tool_calls:
        check_call(call.function.name, call.function.arguments)


def test_auto_is_a_call_or_text(server) -> None:
    c = client(server)
    for question in (ASK[0]["content"], "Write one short sentence about cats."):
        messages = [{"role": "user", "content": question}]
        r = c.chat.completions.create(model="tgi", messages=messages, tools=TOOLS,
                                      temperature=0, max_tokens=64)
        choice = r.choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason == "tool_calls" and choice.message.content is None
            for call in choice.message.tool_calls:
                check_call(call.function.name, call.function.arguments)
        else:
            assert choice.message.content and choice.message.content.lstrip()[0] not in "{["
        # streamed: the same answer
        text, names = "", []
        for chunk in c.chat.completions.create(model="tgi", messages=messages, tools=TOOLS,
                                               temperature=0, max_tokens=64, stream=True):
            delta = chunk.choices[0].delta
            text += delta.content or ""
            names += [tc.function.name for tc in delta.tool_calls or [] if tc.function]
        if choice.message.tool_calls:
            assert names == [tc.function.name for tc in choice.message.tool_calls]
        else:
            assert text == choice.message.content and not names


def test_round_trip_with_a_tool_result(server) -> None:
    c = client(server)
    first = c.chat.completions.create(model="tgi", messages=ASK, tools=TOOLS, temperature=0,
                                      tool_choice="get_weather", max_tokens=96)
    msg = first.choices[0].message
    assert msg.tool_calls
    messages = [*ASK, msg.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": msg.tool_calls[0].id,
                 "content": json.dumps({"temperature": 21, "sky": "sunny"})}]
    second = c.chat.completions.create(model="tgi", messages=messages, tools=TOOLS,
                                       temperature=0, max_tokens=48)
    m2 = second.choices[0].message
    assert m2.role == "assistant" and (m2.content or m2.tool_calls)
    third = c.chat.completions.create(model="tgi", messages=messages, tools=TOOLS,
                                      tool_choice="none", temperature=0, max_tokens=24)
    assert third.choices[0].message.content and not third.choices[0].message.tool_calls
    # the tool result reached the prompt
    tokenized = httpx.post(f"{server.url}/chat_tokenize", timeout=30, json={
        "messages": messages, "tools": TOOLS}).json()["templated_text"]
    assert '"sky": "sunny"' in tokenized and "You can call the following functions" in tokenized
    assert '{"name": "get_weather", "arguments": {' in tokenized  # the call, as text


def bad(**fn: Any) -> list[dict[str, Any]]:
    return [{"type": "function", "function": fn}]


@pytest.mark.parametrize(("body", "needle"), [
    ({"tools": bad(description="no name")}, "`function.name` is required"),
    ({"tools": bad(name="f", parameters="object")}, "must be a JSON Schema object"),
    ({"tools": bad(name="f", parameters={"type": "object", "properties": {
        "x": {"type": "nope"}}})}, "tools[0] ('f'): `function.parameters` is not a valid"),
    ({"tools": [TOOLS[0], TOOLS[0]]}, "duplicate function name 'get_weather'"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "fly"}}},
     "Tool with name fly not found"),
    ({"tool_choice": "required"}, "no `tools` were given"),
    ({"tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(1000)]},
     "up to 128 tools"),
    ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "mutually exclusive"),
    ({"tools": ["get_weather"]}, "tools.0"),
    ({"messages": [*ASK, {"role": "tool", "content": "21C"}]}, "must have a `tool_call_id`"),
    ({"messages": [{"role": "robot", "content": "beep"}]}, "unsupported role 'robot'"),
    ({"messages": [*ASK, {"role": "assistant", "tool_calls": [{"id": "1", "function": {}}]}]},
     "`function.name` is required"),
])
def test_bad_tools_are_422(server, body: dict[str, Any], needle: str) -> None:
    payload = {"model": "tgi", "messages": ASK, "max_tokens": 4, **body}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=payload, timeout=60)
    assert r.status_code == 422, r.text
    assert needle in r.json()["error"]["message"], r.text


def test_openai_client_sees_the_422(server) -> None:
    import openai

    with pytest.raises(openai.UnprocessableEntityError, match="Tool with name fly not found"):
        client(server).chat.completions.create(
            model="tgi", messages=ASK, tools=TOOLS, max_tokens=4,
            tool_choice={"type": "function", "function": {"name": "fly"}})
