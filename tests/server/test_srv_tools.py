"""Tool calling (server/tools.py): validation of tools and tool_choice (bad-input checklist
items 14-15 of shared/notes/ecosystem.md §6), the grammar a call must follow, the prompt, and
the answers' shapes, streamed deltas included (checked with the openai client's own types and
stream accumulator). No server, no model (the default model's tokenizer only)."""

from __future__ import annotations

import copy
import json
from typing import Any

import jsonschema
import llguidance as llg
import orjson
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from tokenmill.frontend.outputs import RequestOutput
from tokenmill.loader import default_model_path
from tokenmill.protocol import FinishReason, TokenLogprob
from tokenmill.server import schemas as S
from tokenmill.server.errors import InputValidationError, RequestError, ToolError
from tokenmill.server.responses import chat_chunk, chat_completion
from tokenmill.server.tools import (
    DEFAULT_TOOL_PROMPT,
    MAX_PARALLEL_CALLS,
    ToolCallStream,
    ToolPlan,
    parse_tool_calls,
    rewrite_completion,
    tool_grammar,
    tool_plan,
    tool_schema,
)
from tokenmill.server.validation import (
    ChatOptions,
    Limits,
    chat_request_to_prompt,
    validate_chat,
)
from tokenmill.tokenizer import Tokenizer, tokenizer_from_gguf

LIMITS = Limits(max_input_tokens=100, max_total_tokens=128, vocab_size=50_000)
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"]}}}
# pydantic-style: `$defs` and `$ref` at the parameters' root.
EVENT = {"type": "function", "function": {
    "name": "add_event", "strict": True,
    "parameters": {"$schema": "https://json-schema.org/draft/2020-12/schema",
                   "$defs": {"Day": {"type": "string", "enum": ["mon", "tue"]}},
                   "type": "object", "properties": {"day": {"$ref": "#/$defs/Day"},
                                                    "title": {"type": "string"}},
                   "required": ["day", "title"], "additionalProperties": False}}}
NOARGS = {"type": "function", "function": {"name": "now"}}
TOOLS = [WEATHER, EVENT, NOARGS]
CALL = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return tokenizer_from_gguf(default_model_path())


@pytest.fixture(scope="module")
def lltok(tok: Tokenizer) -> llg.LLTokenizer:
    return llg.LLTokenizer(tok.backend.to_str(), n_vocab=tok.vocab_size,
                           eos_token=[tok.eos_token_id])


def req(messages: list[dict[str, Any]] | None = None, **body: Any) -> S.ChatCompletionRequest:
    data = {"messages": messages or [{"role": "user", "content": "Weather in Paris?"}], **body}
    return S.ChatCompletionRequest.model_validate(json.loads(json.dumps(data)))


def plan(**body: Any) -> ToolPlan:
    body.setdefault("tools", TOOLS)
    p = tool_plan(req(**body))
    assert p is not None
    return p


# ============================================================================ validation


def test_plans() -> None:
    p = plan()
    assert (p.choice, p.name, p.parallel, p.names) == ("auto", None, True, ["get_weather",
                                                                          "add_event", "now"])
    assert p.functions[2]["parameters"] == {"type": "object", "properties": {},
                                            "additionalProperties": False}
    assert "strict" not in p.functions[1] and "description" not in p.functions[1]
    assert plan(tool_choice="required", parallel_tool_calls=False).parallel is False
    named = plan(tool_choice={"type": "function", "function": {"name": "now"}})
    assert (named.choice, named.name) == ("named", "now")
    assert plan(tool_choice="now").name == "now"  # TGI: a bare function name
    assert plan(tool_prompt="Use JSON.").prompt == "Use JSON."
    assert tool_plan(req(tools=TOOLS, tool_choice="none")) is None
    assert tool_plan(req()) is None and tool_plan(req(tool_choice="auto")) is None
    assert tool_plan(req(tools=[], tool_choice="none")) is None
    # tools with a plain-text response_format are fine
    assert plan(response_format={"type": "text"}).choice == "auto"


def tool_error(**body: Any) -> str:
    with pytest.raises(ToolError) as ei:
        tool_plan(req(**body))
    err = ei.value
    assert (err.status, err.error_type) == (422, "tool_error")
    assert err.message.startswith("Tool error: ")
    return err.message.removeprefix("Tool error: ")


def fn(**function: Any) -> list[dict[str, Any]]:
    return [{"type": "function", "function": function}]


@pytest.mark.parametrize(("body", "message"), [
    ({"tools": fn(description="no name")}, "tools[0]: `function.name` is required"),
    ({"tools": fn(name="")}, "tools[0]: `function.name` is required"),
    ({"tools": fn(name="a b")}, "tools[0]: `function.name` must be 1-64 characters"),
    ({"tools": fn(name="x" * 65)}, "tools[0]: `function.name` must be 1-64 characters"),
    ({"tools": [{"type": "function"}]}, "tools[0]: `function` must be an object"),
    ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]},
     "tools[0]: `type` must be \"function\""),
    ({"tools": fn(name="f", parameters=[1])},
     "tools[0]: `function.parameters` must be a JSON Schema object"),
    ({"tools": fn(name="f", parameters={"type": "string"})},
     "tools[0]: `function.parameters` must describe an object"),
    ({"tools": fn(name="f", description=3)}, "tools[0]: `function.description` must be a"),
    ({"tools": fn(name="f", strict="yes")}, "tools[0]: `function.strict` must be a boolean"),
    ({"tools": [WEATHER, NOARGS, WEATHER]},
     "duplicate function name 'get_weather' (tools[0] and tools[2])"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "Tool with name nope not found"),
    ({"tools": TOOLS, "tool_choice": "nope"}, "Tool with name nope not found"),
    ({"tools": TOOLS, "tool_choice": {"type": "function"}}, "`tool_choice` must be"),
    ({"tools": TOOLS, "tool_choice": {"type": "allowed_tools", "allowed_tools": {}}},
     "`tool_choice` must be"),
    ({"tool_choice": "required"}, "`tool_choice` is \"required\" but no `tools` were given"),
    ({"tools": [], "tool_choice": "required"}, "`tool_choice` is \"required\""),
    ({"tool_choice": {"type": "function", "function": {"name": "f"}}},
     "`tool_choice` names the function 'f' but no `tools` were given"),
    ({"tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(1000)]},
     "`tools` supports up to 128 tools. Given: 1000"),
    ({"tools": TOOLS, "response_format": {"type": "json_object"}},
     "Grammar and tools are mutually exclusive"),
    ({"tools": TOOLS, "response_format": {"type": "regex", "value": "a"}},
     "Grammar and tools are mutually exclusive"),
])
def test_tool_errors(body: dict[str, Any], message: str) -> None:
    assert tool_error(**body).startswith(message)


def test_non_object_tool_is_refused_at_parse_time() -> None:
    with pytest.raises(Exception, match="dict"):
        req(tools=["get_weather"])


def test_invalid_schema_names_the_tool() -> None:
    bad = fn(name="broken", parameters={"type": "object", "properties": {"x": {"type": "foo"}}})
    for choice in ("auto", "required"):
        with pytest.raises(ToolError) as ei:
            validate_chat(req(tools=[WEATHER, *bad], tool_choice=choice), [1, 2], LIMITS)
        msg = ei.value.message
        assert msg.startswith("Tool error: tools[1] ('broken'): `function.parameters` is not a"
                              " valid JSON Schema: "), msg
        assert "Invalid type" in msg or "foo" in msg
    remote = fn(name="remote", parameters={"type": "object", "properties": {
        "x": {"$ref": "https://example.com/schema.json"}}})
    with pytest.raises(ToolError, match="tools\\[0\\] \\('remote'\\)"):
        validate_chat(req(tools=remote, tool_choice="required"), [1, 2], LIMITS)
    # A named choice compiles only that tool: the other's bad schema does not matter.
    p, _ = validate_chat(req(tools=[WEATHER, *bad], tool_choice="get_weather"), [1, 2], LIMITS)
    assert p.grammar is not None


def test_too_large_together_is_a_tool_error() -> None:
    big = {"type": "object", "properties": {f"p{i}": {"enum": [f"value{k}" for k in range(20)]}
                                            for i in range(4)}}
    tools = [{"type": "function", "function": {"name": f"f{i}", "parameters": big}}
             for i in range(100)]
    with pytest.raises(ToolError, match=r"cannot be compiled into a grammar: .*too large"):
        validate_chat(req(tools=tools, tool_choice="required"), [1, 2], LIMITS)


def test_validate_chat_wiring() -> None:
    p, o = validate_chat(req(tools=TOOLS), [1, 2], LIMITS)
    assert o.tools is not None and o.tools.choice == "auto"
    assert p.grammar is not None and p.grammar.kind == "lark"
    p, o = validate_chat(req(tools=TOOLS, tool_choice="required", n=2), [1, 2], LIMITS)
    assert p.grammar is not None and p.grammar.kind == "json" and o.n == 2
    p, o = validate_chat(req(tools=TOOLS, tool_choice="none",
                             response_format={"type": "json_object"}), [1, 2], LIMITS)
    assert o.tools is None and p.grammar is not None and p.grammar.kind == "json_object"
    p, o = validate_chat(req(tools=TOOLS, tool_choice="none"), [1, 2], LIMITS)
    assert o.tools is None and p.grammar is None


@pytest.mark.parametrize(("messages", "error", "message"), [
    ([{"role": "user", "content": "x"}, {"role": "tool", "content": "42"}],
     InputValidationError, "messages[1]: tool messages must have a `tool_call_id`"),
    ([{"role": "robot", "content": "x"}], InputValidationError,
     "messages[0]: unsupported role 'robot'"),
    ([{"role": "user", "content": "x"},
      {"role": "assistant", "tool_calls": [{"id": "1", "type": "function", "function": {}}]}],
     InputValidationError, "messages[1].tool_calls[0]: `function.name` is required"),
    ([{"role": "user", "content": "x", "tool_calls": [CALL]}], InputValidationError,
     "messages[0]: only assistant messages may have `tool_calls`"),
])
def test_bad_messages(tok: Tokenizer, messages: list[dict[str, Any]], error: type[RequestError],
                      message: str) -> None:
    with pytest.raises(error) as ei:
        chat_request_to_prompt(tok, req(messages, tools=TOOLS))
    assert message in ei.value.message
    assert ei.value.status == 422


# ============================================================================ grammar


def accepts(lltok: llg.LLTokenizer, tok: Tokenizer, p: ToolPlan, text: str) -> bool:
    """Whether the plan's grammar accepts `text` as a complete answer."""
    m = llg.LLMatcher(lltok, llg_grammar(p), log_level=0)
    ok = m.consume_tokens(tok.encode(text, add_special_tokens=False))
    return bool(ok) and not m.is_error() and m.is_accepting()


def llg_grammar(p: ToolPlan) -> str:
    from tokenmill.guided.llg_backend import to_llguidance

    return to_llguidance(tool_grammar(p))


def test_schema_shapes() -> None:
    s = tool_schema(plan(tool_choice="required"))
    call = {"name": "add_event", "arguments": {"day": "mon", "title": "Standup"}}
    for good in (CALL, call, [CALL, call], {"name": "now", "arguments": {}}):
        jsonschema.validate(good, s)
    for bad in ({"name": "get_weather", "arguments": {"city": "Paris"}},
                {"name": "add_event", "arguments": {"day": "sun", "title": "x"}},
                {"name": "other", "arguments": {}}, [], [CALL] * (MAX_PARALLEL_CALLS + 1),
                {"name": "now", "arguments": {"extra": 1}}, {**CALL, "more": 1}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, s)
    # the $ref moved with its schema; the root $schema was dropped
    assert s["$defs"]["args_1"]["properties"]["day"] == {"$ref": "#/$defs/args_1/$defs/Day"}
    assert "$schema" not in s["$defs"]["args_1"]
    # undeclared arguments are not generated (the client's schema did not say)
    assert s["$defs"]["args_0"]["additionalProperties"] is False
    single = tool_schema(plan(tool_choice="required", parallel_tool_calls=False))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([CALL], single)
    named = tool_schema(plan(tool_choice="get_weather"))
    jsonschema.validate(CALL, named)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "now", "arguments": {}}, named)


def test_rebase_leaves_data_alone_and_drops_annotations() -> None:
    t = fn(name="f", parameters={"type": "object", "title": "F", "properties": {
        "a": {"const": {"$ref": "#/x", "title": "data"}},
        "b": {"$ref": "#", "description": "recursive"},
        "description": {"type": "string", "description": "a property named description",
                        "examples": ["x"]},
        "title": {"anyOf": [{"type": "integer", "title": "n"}, {"type": "null"}]}},
        "required": ["description", "title"],
        "dependentRequired": {"description": ["title"]}})
    args = tool_schema(plan(tools=t, tool_choice="required"))["$defs"]["args_0"]
    assert args == {"type": "object", "properties": {
        "a": {"const": {"$ref": "#/x", "title": "data"}},
        "b": {"$ref": "#/$defs/args_0"},
        "description": {"type": "string"},
        "title": {"anyOf": [{"type": "integer"}, {"type": "null"}]}},
        "required": ["description", "title"],
        "dependentRequired": {"description": ["title"]}, "additionalProperties": False}


def test_many_tools_fit(tok: Tokenizer) -> None:
    params = {"type": "object", "properties": {
        **{f"p{j}": {"type": "string", "description": "a long description " * 10}
           for j in range(3)},
        "n": {"type": "integer", "minimum": 0}}, "required": ["p0", "n"]}
    tools = [{"type": "function", "function": {"name": f"tool_{i}", "parameters": params}}
             for i in range(128)]
    for choice in ("auto", "required"):
        p, _ = validate_chat(req(tools=tools, tool_choice=choice), [1, 2], LIMITS)
        assert p.grammar is not None and len(p.grammar.value) < 64 * 1024


def test_grammars_accept_calls_only(tok: Tokenizer, lltok: llg.LLTokenizer) -> None:
    call = json.dumps(CALL, separators=(",", ":"))
    event = '{"name":"add_event","arguments":{"day":"tue","title":"Lunch"}}'
    required = plan(tool_choice="required")
    assert accepts(lltok, tok, required, call) and accepts(lltok, tok, required, event)
    assert accepts(lltok, tok, required, f"[{call},{event}]")
    assert not accepts(lltok, tok, required, "Sure!")
    assert not accepts(lltok, tok, required, call[:-1])  # incomplete
    assert not accepts(lltok, tok, required, call.replace("Paris", "P" * 30))  # maxLength
    assert not accepts(lltok, tok, required, '{"name":"get_weather","arguments":{"city":"P"}}')
    one = plan(tool_choice="required", parallel_tool_calls=False)
    assert accepts(lltok, tok, one, call) and not accepts(lltok, tok, one, f"[{call}]")
    named = plan(tool_choice="add_event")
    assert accepts(lltok, tok, named, event) and not accepts(lltok, tok, named, call)


def test_auto_grammar_is_a_call_or_text(tok: Tokenizer, lltok: llg.LLTokenizer) -> None:
    auto = plan()
    call = json.dumps(CALL, separators=(",", ":"))
    for text in (call, "\n " + call, f"[{call}]", "It is sunny.", "  Hello {there}", "Hi\n\n[x]"):
        assert accepts(lltok, tok, auto, text), text
    for text in ("{not a call}", ' {"name":"nope","arguments":{}}', "[1, 2]", call + " and"):
        assert not accepts(lltok, tok, auto, text), text
    single = plan(parallel_tool_calls=False)
    assert accepts(lltok, tok, single, "[a markdown link](x)")


# ============================================================================ prompt


def test_tools_injected_when_the_template_ignores_them(tok: Tokenizer) -> None:
    text = chat_request_to_prompt(tok, req(tools=TOOLS))
    assert text.startswith("<|im_start|>system\nYou can call the following functions:\n"
                           '{"name": "get_weather", "description": "Weather in a city"')
    assert DEFAULT_TOOL_PROMPT in text and "answer in plain text" in text
    assert text.endswith("<|im_start|>user\nWeather in Paris?<|im_end|>\n"
                         "<|im_start|>assistant\n")
    # appended to an existing system message; a custom tool_prompt replaces the default
    text = chat_request_to_prompt(tok, req([{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "Hi"}],
                                           tools=TOOLS, tool_choice="required",
                                           tool_prompt="Call one."))
    assert text.startswith("<|im_start|>system\nBe brief.\n\nYou can call the following")
    assert "Call one.<|im_end|>" in text and DEFAULT_TOOL_PROMPT not in text
    # none: no tools at all
    plain = chat_request_to_prompt(tok, req())
    assert chat_request_to_prompt(tok, req(tools=TOOLS, tool_choice="none")) == plain


def with_template(tok: Tokenizer, template: str) -> Tokenizer:
    t = copy.copy(tok)
    t.chat_template = template
    return t


NATIVE = ("{% if tools %}TOOLS{{ tools | map(attribute='function') | map(attribute='name') "
          "| join(',') }}|{% endif %}{% for m in messages %}[{{ m.role }}]{{ m.content }}"
          "{% for c in m.tool_calls or [] %}<call {{ c.function.name }} "
          "{{ c.function.arguments | tojson }}>{% endfor %}|{% endfor %}")


def test_template_rendering_tools_natively(tok: Tokenizer) -> None:
    native = with_template(tok, NATIVE)
    text = chat_request_to_prompt(native, req(tools=TOOLS))
    assert text == "TOOLSget_weather,add_event,now|[user]Weather in Paris?|"
    text = chat_request_to_prompt(native, req(tools=TOOLS, tool_prompt="Be exact."))
    assert text.startswith("TOOLSget_weather,add_event,now|[system]Be exact.|")
    # history: arguments given to the template as an object, as transformers expects
    history = [{"role": "user", "content": "Weather?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function", "function": {
                       "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "22C"}]
    text = chat_request_to_prompt(native, req(history, tools=TOOLS))
    assert '[assistant]<call get_weather {"city": "Paris"}>|[tool]22C|' in text


def test_history_with_a_template_that_ignores_tool_calls(tok: Tokenizer) -> None:
    history = [{"role": "user", "content": "Weather?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function", "function": {
                       "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "22C"}]
    text = chat_request_to_prompt(tok, req(history, tools=TOOLS))
    assert ('<|im_start|>assistant\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
            '<|im_end|>\n<|im_start|>tool\n22C<|im_end|>\n<|im_start|>assistant\n') in text


STRICT_ROLES = ("{% for m in messages %}{% if m.role not in ['system', 'user', 'assistant'] %}"
                "{{ raise_exception('unknown role ' + m.role) }}{% endif %}"
                "<{{ m.role }}>{{ m.content }}{% endfor %}")


def test_tool_results_as_user_text_when_the_template_refuses_them(tok: Tokenizer) -> None:
    strict = with_template(tok, STRICT_ROLES)
    history = [{"role": "user", "content": "Weather and time?"},
               {"role": "assistant", "content": "", "tool_calls": [
                   {"id": "c1", "type": "function",
                    "function": {"name": "get_weather", "arguments": "{}"}},
                   {"id": "c2", "type": "function", "function": {"name": "now",
                                                                 "arguments": "{}"}}]},
               {"role": "tool", "tool_call_id": "c1", "content": "22C"},
               {"role": "tool", "tool_call_id": "c2", "content": "noon"}]
    text = chat_request_to_prompt(strict, req(history, tools=TOOLS, tool_choice="none"))
    assert text == ('<user>Weather and time?<assistant>[{"name": "get_weather", "arguments": {}},'
                    ' {"name": "now", "arguments": {}}]<user>Tool result (call c1, function'
                    ' get_weather):\n22C\n\nTool result (call c2, function now):\nnoon')
    # a template failing for another reason still fails (a 422 template error)
    from tokenmill.server.errors import TemplateError

    with pytest.raises(TemplateError, match="nope"):
        chat_request_to_prompt(with_template(tok, "{{ raise_exception('nope') }}"),
                               req(history, tools=TOOLS))


# ============================================================================ answers


def out_of(tok: Tokenizer, text: str, finish: FinishReason = FinishReason.EOS,
           logprobs: bool = False) -> RequestOutput:
    ids = tok.encode(text, add_special_tokens=False)
    lps = [TokenLogprob(t, -0.5) for t in ids] if logprobs else None
    return RequestOutput(request_id="r", prompt_token_ids=[1, 2], text=text, token_ids=ids,
                         new_token_ids=ids, finished=True, finish_reason=finish, logprobs=lps)


def updates(tok: Tokenizer, text: str, finish: FinishReason = FinishReason.EOS,
            logprobs: bool = False) -> list[RequestOutput]:
    """One update per token, as the engine streams them."""
    ids = tok.encode(text, add_special_tokens=False)
    outs, sofar = [], ""
    for k in range(len(ids)):
        now = tok.decode(ids[:k + 1])
        last = k == len(ids) - 1
        outs.append(RequestOutput(
            request_id="r", prompt_token_ids=[1, 2], text=now, delta=now[len(sofar):],
            token_ids=ids[:k + 1], new_token_ids=[ids[k]], finished=last,
            finish_reason=finish if last else None,
            logprobs=[TokenLogprob(t, -0.5) for t in ids[:k + 1]] if logprobs else None))
        sofar = now
    return outs


def test_parse_tool_calls() -> None:
    p = plan()
    calls = parse_tool_calls(' {"name":"get_weather","arguments":{"city":"Paris","unit":"c"}}',
                             p)
    assert calls is not None and len(calls) == 1
    c = calls[0]
    assert c["type"] == "function" and c["id"].startswith("call_") and len(c["id"]) == 29
    assert c["function"] == {"name": "get_weather",
                             "arguments": '{"city":"Paris","unit":"c"}'}
    two = parse_tool_calls('[{"name":"now","arguments":{}},{"name":"now","arguments":{}}]', p)
    assert two is not None and [x["function"]["arguments"] for x in two] == ["{}", "{}"]
    assert two[0]["id"] != two[1]["id"]
    for text in ("Hello", '{"name":"get_weather"', '{"name":"zzz","arguments":{}}', "[]",
                 '{"name":"now"}', "", "[1]"):
        assert parse_tool_calls(text, p) is None, text
    assert parse_tool_calls('[{"name":"now","arguments":{}}]',
                            plan(parallel_tool_calls=False)) is None


def test_completion_with_calls_and_text(tok: Tokenizer) -> None:
    opts = ChatOptions(n=2, logprobs=True, tools=plan())
    outs = [out_of(tok, json.dumps(CALL), logprobs=True),
            out_of(tok, "It is sunny.", logprobs=True)]
    body = rewrite_completion(chat_completion(outs, "m", 1, "id", tok, opts, 2), plan())
    body = orjson.loads(orjson.dumps(body))
    ChatCompletion.model_validate(body)
    S.ChatCompletion.model_validate(body)
    first, second = body["choices"]
    assert first["finish_reason"] == "tool_calls" and first["message"]["content"] is None
    (call,) = first["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == CALL["arguments"]
    assert first["logprobs"]["content"]  # kept
    assert second["message"] == {"role": "assistant", "content": "It is sunny."}
    assert second["finish_reason"] == "stop"
    # a call cut by max_tokens stays text, with its finish_reason
    cut = rewrite_completion(chat_completion([out_of(tok, json.dumps(CALL)[:20],
                                                     FinishReason.LENGTH)], "m", 1, "id", tok,
                                             opts, 2), plan())
    assert cut["choices"][0]["finish_reason"] == "length"
    assert cut["choices"][0]["message"]["content"] == json.dumps(CALL)[:20]


def stream(tok: Tokenizer, texts: list[str], p: ToolPlan, *, finish: FinishReason =
           FinishReason.EOS, logprobs: bool = False) -> list[dict[str, Any]]:
    """The chunks a stream of these choices sends (choices interleaved token by token)."""
    opts = ChatOptions(n=len(texts), logprobs=logprobs, stream=True, tools=p)
    calls = ToolCallStream(p)
    per_choice = [updates(tok, t, finish, logprobs) for t in texts]
    chunks = []
    for k in range(max(map(len, per_choice))):
        for i, ups in enumerate(per_choice):
            if k < len(ups):
                c = chat_chunk(ups[k], "m", 1, "id", tok, opts, index=i, first=k == 0)
                chunks += calls.feed(c)
    chunks = orjson.loads(orjson.dumps(chunks))
    for c in chunks:
        ChatCompletionChunk.model_validate(c)
        S.ChatCompletionChunk.model_validate(c)
    return chunks


def accumulate(chunks: list[dict[str, Any]]) -> ChatCompletion:
    state: ChatCompletionStreamState[Any] = ChatCompletionStreamState()
    for c in chunks:
        state.handle_chunk(ChatCompletionChunk.model_validate(c))
    return state.get_final_completion()


def test_stream_of_a_call(tok: Tokenizer) -> None:
    chunks = stream(tok, [json.dumps(CALL, separators=(",", ":"))], plan(tool_choice="required"),
                    logprobs=True)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": None}  # at once, before the call
    (tc,) = deltas[1]["tool_calls"]
    assert set(tc) == {"index", "id", "type", "function"} and tc["index"] == 0
    assert tc["function"]["name"] == "get_weather"
    assert json.loads(tc["function"]["arguments"]) == CALL["arguments"]
    assert chunks[1]["choices"][0]["logprobs"]["content"]  # the held-back tokens' logprobs
    assert deltas[2] == {} and chunks[2]["choices"][0]["finish_reason"] == "tool_calls"
    assert len(chunks) == 3
    final = accumulate(chunks)
    msg = final.choices[0].message
    assert final.choices[0].finish_reason == "tool_calls" and msg.content is None
    assert msg.tool_calls is not None and msg.tool_calls[0].function.name == "get_weather"


def test_stream_of_parallel_calls(tok: Tokenizer) -> None:
    two = json.dumps([CALL, {"name": "now", "arguments": {}}])
    chunks = stream(tok, [two], plan(tool_choice="required"))
    final = accumulate(chunks)
    calls = final.choices[0].message.tool_calls
    assert calls is not None and [c.function.name for c in calls] == ["get_weather", "now"]
    assert [c.function.arguments for c in calls] == [json.dumps(CALL["arguments"],
                                                                separators=(",", ":")), "{}"]
    assert len({c.id for c in calls}) == 2


def test_stream_text_under_auto(tok: Tokenizer) -> None:
    text = "\n  It is sunny in Paris today, about twenty degrees."
    chunks = stream(tok, [text], plan())
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    # held back only until the first non-space character, then token by token
    contents = [c["choices"][0]["delta"].get("content") for c in chunks]
    assert "".join(x or "" for x in contents) == text
    assert contents[0] is None or contents[0].strip()
    assert len(chunks) > 5
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    final = accumulate(chunks)
    assert final.choices[0].message.content == text and not final.choices[0].message.tool_calls
    # no logprob is lost, held back or not (whitespace-only answers included)
    for answer in (text, "  ", json.dumps(CALL)):
        n_tokens = len(tok.encode(answer, add_special_tokens=False))
        chunks = stream(tok, [answer], plan(), logprobs=True)
        assert sum(len((c["choices"][0]["logprobs"] or {}).get("content") or [])
                   for c in chunks) == n_tokens


def test_stream_cut_call_and_n2(tok: Tokenizer) -> None:
    call = json.dumps(CALL)
    chunks = stream(tok, [call[:25], "Sunny."], plan(), finish=FinishReason.LENGTH)
    by_index: dict[int, list[dict[str, Any]]] = {0: [], 1: []}
    for c in chunks:
        by_index[c["choices"][0]["index"]].append(c)
    cut = by_index[0]
    assert cut[-1]["choices"][0]["delta"]["content"] == call[:25]
    assert cut[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in by_index[1]) \
        == "Sunny."
    # two calls in two choices keep their own ids and indexes
    chunks = stream(tok, [call, call], plan(tool_choice="required"))
    final = accumulate(chunks)
    ids = [c.message.tool_calls[0].id for c in final.choices if c.message.tool_calls]
    assert len(ids) == 2 and ids[0] != ids[1]
    assert [c.finish_reason for c in final.choices] == ["tool_calls", "tool_calls"]
