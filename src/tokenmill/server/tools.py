"""Tool calling on ``/v1/chat/completions``: OpenAI function tools → prompt, grammar, answers.

A request with ``tools`` goes through four steps, all here:

1. **Validation** (:func:`tool_plan`): every tool is ``{"type": "function", "function":
   {"name", "description"?, "parameters"?, "strict"?}}`` with a name of 1-64 characters of
   ``[A-Za-z0-9_-]`` (OpenAI's rule), unique, at most :data:`MAX_TOOLS` of them, ``parameters``
   a JSON Schema object. ``tool_choice`` is ``auto`` (the default with tools), ``none``,
   ``required``, ``{"type": "function", "function": {"name"}}`` or (TGI) a bare function name.
   Errors are 422 ``tool_error`` ("Tool error: ..."); ``response_format`` together with active
   tools is refused as in TGI ("Grammar and tools are mutually exclusive").
2. **Prompt** (:func:`render_chat`): the tools go to the chat template (``tools=``, as
   transformers passes them). A template that ignores them (it renders the same text with and
   without) gets them TGI-style instead: a system instruction listing each function's JSON
   and the tool prompt (``tool_prompt``, default :data:`DEFAULT_TOOL_PROMPT`), appended to the
   first system message or inserted as one. ``tool_choice: none`` renders no tools.
   History: assistant ``tool_calls`` go to the template with their ``arguments`` parsed into
   objects (as vLLM does; templates read them as mappings); a template that ignores
   ``tool_calls`` gets them as the message's text, in the same JSON form the model is asked to
   write. A template that fails on ``tool`` messages gets them as user messages
   (``Tool result (call <id>, function <name>):`` followed by the content; consecutive results
   merged into one message).
3. **Grammar** (:func:`tool_grammar`): a call is the JSON ``{"name": <one of the names>,
   "arguments": <that function's parameters schema>}``. ``required`` allows one call, or with
   ``parallel_tool_calls`` (the default) also an array of 1..:data:`MAX_PARALLEL_CALLS` calls;
   a named choice allows exactly one call of that function; ``auto`` is a Lark grammar
   ``optional whitespace, then a call | free text`` whose text cannot start (after whitespace)
   with ``{`` (nor ``[`` with parallel calls). Arguments not declared in ``properties`` are
   not generated unless the schema says what other keys may hold (``additionalProperties:
   false`` is added otherwise). Annotations (descriptions, titles, examples) stay in the
   prompt but not in the grammar, which must fit the 64 KiB grammar cap. The grammar is
   compiled like any other (422 with the compiler's message, naming the faulty tool when one
   schema alone fails).
4. **Answers**: :func:`parse_tool_calls` turns the generated text into OpenAI ``tool_calls``
   (``id`` ``call_<24 hex>``, ``arguments`` a compact JSON string); the message then has
   ``content: null`` and ``finish_reason: "tool_calls"``. Text that is not a complete call
   (free text under ``auto``, or a call cut by ``max_tokens``) stays ``content`` with its own
   finish_reason. Streams (:class:`ToolCallStream`) send the role first, hold the text back
   until its first non-space character tells a call from text, stream text as usual, and send
   a call once complete: one ``tool_calls`` delta per call (``index``, ``id``, ``type``,
   ``function.name`` and the whole ``function.arguments``), then a last chunk with
   ``finish_reason: "tool_calls"``.
"""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from tokenmill.guided import GrammarError, check_grammar
from tokenmill.protocol import GrammarSpec
from tokenmill.server.errors import InputValidationError, ToolError
from tokenmill.tokenizer.chat_template import ChatTemplateError

from .schemas import ChatCompletionRequest

__all__ = [
    "DEFAULT_TOOL_PROMPT",
    "MAX_PARALLEL_CALLS",
    "MAX_TOOLS",
    "ToolCallStream",
    "ToolPlan",
    "parse_tool_calls",
    "render_chat",
    "rewrite_completion",
    "template_tool_calls",
    "tool_grammar",
    "tool_plan",
]

MAX_TOOLS = 128
MAX_PARALLEL_CALLS = 8
DEFAULT_TOOL_PROMPT = (
    "Given the functions available, please respond with a JSON for a function call with its"
    " proper arguments that best answers the given prompt. Respond in the format"
    ' {"name": function name, "arguments": dictionary of argument name and its value}.'
    " Do not use variables."
)
_AUTO_HINT = " If no function fits the request, answer in plain text instead."
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
# JSON Schema keywords whose values are data (not schemas), maps of names to schemas, and
# annotations (which constrain nothing).
_DATA_KEYWORDS = frozenset({"const", "enum", "default", "required", "dependentRequired"})
_SCHEMA_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions",
                          "dependentSchemas"})
_ANNOTATIONS = frozenset({"description", "title", "examples", "$comment"})
_WS = " \t\r\n"

Choice = Literal["auto", "required", "named"]
#: (messages, tools or None, add_generation_prompt) -> prompt text; raises ChatTemplateError.
Render = Callable[[list[dict[str, Any]], "list[dict[str, Any]] | None", bool], str]


@dataclass(frozen=True)
class ToolPlan:
    """The validated tools of a request whose answer is constrained to call them (never built
    for ``tool_choice: none``)."""

    functions: tuple[dict[str, Any], ...]  # {"name", "description"?, "parameters"}
    choice: Choice = "auto"
    name: str | None = None  # the forced function when choice == "named"
    parallel: bool = True
    prompt: str | None = None  # the client's tool_prompt

    @property
    def names(self) -> list[str]:
        return [f["name"] for f in self.functions]

    @property
    def call_starts(self) -> str:
        """First characters (after whitespace) of a call; any other one starts text."""
        return "{[" if self.parallel and self.choice != "named" else "{"

    def template_tools(self) -> list[dict[str, Any]]:
        return [{"type": "function", "function": dict(f)} for f in self.functions]


# ============================================================================ validation


def _tool_error(message: str) -> ToolError:
    return ToolError(message)


def _function(i: int, tool: Any) -> dict[str, Any]:
    where = f"tools[{i}]"
    if not isinstance(tool, dict):
        raise _tool_error(f"{where} must be an object")
    if tool.get("type", "function") != "function":
        raise _tool_error(f"{where}: `type` must be \"function\". Given: {tool.get('type')!r}")
    fn = tool.get("function")
    if not isinstance(fn, dict):
        raise _tool_error(f"{where}: `function` must be an object with a `name`")
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise _tool_error(f"{where}: `function.name` is required")
    if not _NAME.fullmatch(name):
        raise _tool_error(f"{where}: `function.name` must be 1-64 characters of a-z, A-Z, 0-9,"
                          f" _ and -. Given: {name[:80]!r}")
    desc = fn.get("description")
    if desc is not None and not isinstance(desc, str):
        raise _tool_error(f"{where}: `function.description` must be a string")
    params = fn.get("parameters")
    if params is None:  # OpenAI: no parameters means an empty parameter list
        params = {"type": "object", "properties": {}, "additionalProperties": False}
    if not isinstance(params, dict):
        raise _tool_error(f"{where}: `function.parameters` must be a JSON Schema object")
    if params.get("type", "object") != "object":
        raise _tool_error(f"{where}: `function.parameters` must describe an object"
                          f" (`type: object`). Given: {params.get('type')!r}")
    strict = fn.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise _tool_error(f"{where}: `function.strict` must be a boolean")
    out: dict[str, Any] = {"name": name}
    if desc is not None:
        out["description"] = desc
    out["parameters"] = params
    return out


def _choice(raw: str | dict[str, Any] | None, names: Sequence[str]) -> tuple[str, str | None]:
    """(``none`` | ``auto`` | ``required`` | ``named``, the named function)."""
    if raw is None:
        return ("auto" if names else "none"), None
    if isinstance(raw, str):
        if raw in ("none", "auto", "required"):
            return raw, None
        name = raw  # TGI accepts a bare function name
    else:
        fn = raw.get("function")
        if raw.get("type") != "function" or not isinstance(fn, dict) \
                or not isinstance(fn.get("name"), str):
            raise _tool_error('`tool_choice` must be "none", "auto", "required" or {"type":'
                              ' "function", "function": {"name": ...}}')
        name = fn["name"]
    if not names:
        raise _tool_error(f"`tool_choice` names the function '{name[:80]}' but no `tools`"
                          " were given")
    if name not in names:
        raise _tool_error(f"Tool with name {name[:80]} not found")
    return "named", name


def tool_plan(req: ChatCompletionRequest) -> ToolPlan | None:
    """Validate ``tools``, ``tool_choice`` and ``parallel_tool_calls``; None when the answer is
    free (no tools, or ``tool_choice: none``). Raises ToolError (422)."""
    tools = req.tools or []
    if len(tools) > MAX_TOOLS:
        raise _tool_error(f"`tools` supports up to {MAX_TOOLS} tools. Given: {len(tools)}")
    functions = [_function(i, t) for i, t in enumerate(tools)]
    seen: dict[str, int] = {}
    for i, f in enumerate(functions):
        if f["name"] in seen:
            raise _tool_error(f"duplicate function name '{f['name']}' (tools[{seen[f['name']]}]"
                              f" and tools[{i}])")
        seen[f["name"]] = i
    choice, name = _choice(req.tool_choice, list(seen))
    if choice == "required" and not functions:
        raise _tool_error("`tool_choice` is \"required\" but no `tools` were given")
    if choice == "none" or not functions:  # `auto` without tools: free text
        return None
    fmt = req.response_format
    if fmt is not None and (fmt.get("type", "text") != "text" or "value" in fmt):
        raise _tool_error("Grammar and tools are mutually exclusive")
    return ToolPlan(functions=tuple(functions), choice=choice,  # type: ignore[arg-type]
                    name=name, parallel=req.parallel_tool_calls is not False,
                    prompt=req.tool_prompt)


# ============================================================================ grammar


def _rebase(schema: Any, base: str) -> Any:
    """``schema`` as the grammar needs it, moved under the JSON pointer `base`: its local
    ``$ref``s (``#`` and ``#/...``) are rewritten to point inside it (pydantic's
    ``#/$defs/X`` keep working), and annotations that constrain nothing (descriptions,
    titles, examples, comments) are dropped, so that many tools fit the grammar size cap."""
    if isinstance(schema, list):
        return [_rebase(v, base) if isinstance(v, dict) else v for v in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for k, v in schema.items():
        if k in _ANNOTATIONS:
            continue
        if k == "$ref" and isinstance(v, str) and (v == "#" or v.startswith("#/")):
            out[k] = base + v[1:]
        elif k in _SCHEMA_MAPS and isinstance(v, dict):  # names → schemas
            out[k] = {name: _rebase(sub, base) for name, sub in v.items()}
        elif k in _DATA_KEYWORDS:
            out[k] = v
        else:
            out[k] = _rebase(v, base)
    return out


_OPEN_KEYWORDS = ("additionalProperties", "patternProperties", "unevaluatedProperties")


def _arguments_schema(params: dict[str, Any]) -> dict[str, Any]:
    """What the arguments object must match. A root `$id` would make the rebased `#/...` refs
    resolve against it, and `$schema` is noise: both dropped. Undeclared arguments are not
    generated: with `properties` and no rule for other keys, ``additionalProperties: false``
    is added (a call still validates against the client's schema; small models otherwise
    invent arguments until max_tokens)."""
    out = {k: v for k, v in params.items() if k not in ("$id", "$schema")}
    if "properties" in out and not any(k in out for k in _OPEN_KEYWORDS):
        out["additionalProperties"] = False
    return out


def tool_schema(plan: ToolPlan) -> dict[str, Any]:
    """The JSON Schema of what the model may write: one call (a ``anyOf`` over the functions,
    each ``{"name": const, "arguments": its parameters}``) or, for ``required`` with parallel
    calls, also an array of 1..MAX_PARALLEL_CALLS calls."""
    defs: dict[str, Any] = {}
    calls = []
    for i, f in enumerate(plan.functions):
        if plan.choice == "named" and f["name"] != plan.name:
            continue
        defs[f"args_{i}"] = _rebase(_arguments_schema(f["parameters"]), f"#/$defs/args_{i}")
        calls.append({
            "type": "object",
            "properties": {"name": {"const": f["name"]},
                           "arguments": {"$ref": f"#/$defs/args_{i}"}},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        })
    defs["call"] = {"anyOf": calls} if len(calls) > 1 else calls[0]
    ref = {"$ref": "#/$defs/call"}
    if plan.choice == "named" or not plan.parallel:
        return {"$defs": defs, "anyOf": [ref]}
    return {"$defs": defs, "anyOf": [ref, {"type": "array", "items": ref, "minItems": 1,
                                            "maxItems": MAX_PARALLEL_CALLS}]}


def _lark(plan: ToolPlan, schema: dict[str, Any]) -> str:
    """``auto``: optional whitespace then a call, or text whose first non-space character
    cannot start a call."""
    embedded = {**schema, "x-guidance": {"whitespace_flexible": False}}
    starts = re.escape(plan.call_starts)
    return (
        "start: WS? call | text\n"
        "WS: /[ \\t\\r\\n]+/\n"
        f"call: %json {json.dumps(embedded, ensure_ascii=False, separators=(',', ':'))}\n"
        "text: TEXT\n"
        f"TEXT: /[ \\t\\r\\n]*[^{starts} \\t\\r\\n][\\s\\S]*/\n"
    )


def _check_tool(i: int, f: dict[str, Any]) -> None:
    text = json.dumps(_arguments_schema(f["parameters"]), ensure_ascii=False, allow_nan=False)
    try:
        check_grammar(GrammarSpec(kind="json", value=text))
    except GrammarError as e:
        raise _tool_error(f"tools[{i}] ('{f['name']}'): `function.parameters` is not a valid"
                          f" JSON Schema: {e}") from None


def tool_grammar(plan: ToolPlan) -> GrammarSpec:
    """The plan's grammar, compiled (checked) like any request grammar. Raises ToolError
    naming the tool whose parameters schema does not compile, or with the compiler's
    message when only the whole does not (e.g. over the size cap)."""
    schema = tool_schema(plan)
    try:
        if plan.choice == "auto":
            spec = GrammarSpec(kind="lark", value=_lark(plan, schema))
        else:
            spec = GrammarSpec(kind="json", value=json.dumps(
                schema, ensure_ascii=False, separators=(",", ":"), allow_nan=False))
    except (ValueError, RecursionError) as e:
        raise _tool_error(f"the tools' parameters cannot be serialized: {e}") from None
    try:
        check_grammar(spec)
    except GrammarError as e:
        for i, f in enumerate(plan.functions):
            if plan.choice != "named" or f["name"] == plan.name:
                _check_tool(i, f)
        raise _tool_error(f"the tools cannot be compiled into a grammar: {e}") from None
    return spec


# ============================================================================ prompt


def template_tool_calls(index: int, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """An assistant message's ``tool_calls`` as template input: checked (a ``function.name``
    each) and with ``arguments`` parsed from their JSON string when they are one."""
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise InputValidationError(f"messages[{index}].tool_calls[{j}]: `function.name` is"
                                       " required")
        args = fn.get("arguments")
        if isinstance(args, str):
            with contextlib.suppress(ValueError, RecursionError):  # else the client's string
                args = json.loads(args) if args.strip() else {}
        entry: dict[str, Any] = {"type": "function",
                                 "function": {"name": fn["name"], "arguments": args}}
        if isinstance(call.get("id"), str):
            entry["id"] = call["id"]
        out.append(entry)
    return out


def _calls_text(calls: list[dict[str, Any]]) -> str:
    """Calls in the form the model is asked to write (one object, or a list)."""
    items = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
             for c in calls]
    return json.dumps(items[0] if len(items) == 1 else items, ensure_ascii=False)


def _calls_ignored(render: Render, message: dict[str, Any]) -> bool:
    """Whether the template drops an assistant message's ``tool_calls`` (or fails on them)."""
    probe = [{"role": "user", "content": "?"}, message]
    bare = [probe[0], {k: v for k, v in message.items() if k != "tool_calls"}]
    try:
        return render(probe, None, False) == render(bare, None, False)
    except ChatTemplateError:
        return True


def _calls_as_text(render: Render, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    with_calls = [m for m in messages if m.get("tool_calls")]
    if not with_calls or not _calls_ignored(render, with_calls[0]):
        return messages
    out = []
    for m in messages:
        if m.get("tool_calls"):
            text = _calls_text(m["tool_calls"])
            content = f"{m['content']}\n{text}" if m.get("content") else text
            m = {**{k: v for k, v in m.items() if k != "tool_calls"}, "content": content}
        out.append(m)
    return out


def _call_names(messages: list[dict[str, Any]]) -> dict[str, str]:
    return {c["id"]: c["function"]["name"] for m in messages for c in m.get("tool_calls") or ()
            if "id" in c}


def _tool_results_as_user(messages: list[dict[str, Any]],
                          names: dict[str, str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    merging = False
    for m in messages:
        if m["role"] != "tool":
            out.append(m)
            merging = False
            continue
        cid = m.get("tool_call_id", "")
        name = m.get("name") or names.get(cid, "unknown")
        text = f"Tool result (call {cid}, function {name}):\n{m['content']}"
        if merging:
            out[-1] = {**out[-1], "content": out[-1]["content"] + "\n\n" + text}
        else:
            out.append({"role": "user", "content": text})
            merging = True
    return out


def _instruction(plan: ToolPlan, list_tools: bool) -> str:
    prompt = plan.prompt if plan.prompt is not None else DEFAULT_TOOL_PROMPT + (
        _AUTO_HINT if plan.choice == "auto" else "")
    if not list_tools:
        return prompt
    listing = "\n".join(json.dumps(f, ensure_ascii=False) for f in plan.functions)
    return f"You can call the following functions:\n{listing}\n\n{prompt}"


def _with_instruction(messages: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    if messages and messages[0]["role"] == "system":
        first = messages[0]
        content = f"{first['content']}\n\n{text}" if first["content"] else text
        return [{**first, "content": content}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def _render_tools(render: Render, messages: list[dict[str, Any]], plan: ToolPlan | None,
                  agp: bool) -> str:
    if plan is None:
        return render(messages, None, agp)
    tools = plan.template_tools()
    native = render(messages, tools, agp)
    if native != render(messages, None, agp):  # the template shows the tools itself
        if plan.prompt is None:
            return native
        return render(_with_instruction(messages, _instruction(plan, False)), tools, agp)
    return render(_with_instruction(messages, _instruction(plan, True)), None, agp)


def render_chat(render: Render, messages: list[dict[str, Any]], plan: ToolPlan | None, *,
                add_generation_prompt: bool = True) -> str:
    """The prompt for `messages` with the plan's tools (see the module docstring). `render`
    is the tokenizer's template with the request's other arguments bound. Raises
    ChatTemplateError when the template fails even with tool results as user text."""
    names = _call_names(messages)
    messages = _calls_as_text(render, messages)
    try:
        return _render_tools(render, messages, plan, add_generation_prompt)
    except ChatTemplateError:
        if not any(m["role"] == "tool" for m in messages):
            raise
    return _render_tools(render, _tool_results_as_user(messages, names), plan, add_generation_prompt)


# ============================================================================ answers


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def parse_tool_calls(text: str, plan: ToolPlan) -> list[dict[str, Any]] | None:
    """OpenAI ``tool_calls`` for a generated `text`, or None when it is not one complete call
    (or array of calls) of the plan's functions."""
    s = text.strip(_WS)
    if not s or s[0] not in plan.call_starts:
        return None
    try:
        value = json.loads(s)
    except (ValueError, RecursionError):
        return None
    items = value if isinstance(value, list) else [value]
    names = set(plan.names)
    calls = []
    for item in items:
        if not isinstance(item, dict) or item.get("name") not in names or "arguments" not in item:
            return None
        calls.append({"id": new_call_id(), "type": "function", "function": {
            "name": item["name"],
            "arguments": json.dumps(item["arguments"], ensure_ascii=False,
                                    separators=(",", ":")),
        }})
    return calls or None


def rewrite_completion(body: dict[str, Any], plan: ToolPlan) -> dict[str, Any]:
    """A ``chat.completion`` body (in place): choices whose text is a call get ``tool_calls``,
    ``content: null`` and ``finish_reason: "tool_calls"``."""
    for choice in body["choices"]:
        calls = parse_tool_calls(choice["message"].get("content") or "", plan)
        if calls is not None:
            choice["message"] = {"role": "assistant", "content": None, "tool_calls": calls}
            choice["finish_reason"] = "tool_calls"
    return body


@dataclass
class _ChoiceState:
    mode: Literal["", "text", "call"] = ""  # "": not decided yet
    role_sent: bool = False
    text: str = ""
    logprobs: list[dict[str, Any]] | None = None


@dataclass
class ToolCallStream:
    """Rewrites a tool request's ``chat.completion.chunk`` bodies (as :func:`chat_chunk`
    builds them, one per update) into what the openai client expects; see the module
    docstring. :meth:`feed` returns the chunks to send now (possibly none)."""

    plan: ToolPlan
    states: dict[int, _ChoiceState] = field(default_factory=dict)

    def feed(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        choice = chunk["choices"][0]
        st = self.states.setdefault(choice["index"], _ChoiceState())
        if st.mode == "text":
            return [chunk]
        st.text += choice["delta"].get("content") or ""
        if choice.get("logprobs") is not None:
            st.logprobs = (st.logprobs or []) + list(choice["logprobs"].get("content") or [])
        finish = choice.get("finish_reason")
        start = st.text.lstrip(_WS)[:1]
        if not st.mode and start:
            st.mode = "call" if start in self.plan.call_starts else "text"
        if st.mode == "text":
            return [self._emit(chunk, st, {"content": st.text}, finish)]
        if finish is None:  # a call (or only whitespace so far): held back until complete
            return [] if st.role_sent else [self._emit(chunk, st, {"content": None}, None,
                                                       logprobs=False)]
        calls = parse_tool_calls(st.text, self.plan)
        if calls is None:  # not a complete call (cut by max_tokens): plain content
            st.mode = "text"
            return [self._emit(chunk, st, {"content": st.text}, finish)]
        out = [self._emit(chunk, st, {"content": None, "tool_calls": [{"index": k, **c}]}, None)
               for k, c in enumerate(calls)]
        out.append(self._emit(chunk, st, {}, "tool_calls", logprobs=False))
        return out

    def _emit(self, chunk: dict[str, Any], st: _ChoiceState, delta: dict[str, Any],
              finish: str | None, *, logprobs: bool = True) -> dict[str, Any]:
        """A chunk of `chunk`'s head with this delta; the role goes with the first one, the
        held-back tokens' logprobs with the first that carries text or a call."""
        if not st.role_sent:
            delta = {"role": "assistant", **delta}
            st.role_sent = True
        lps = None
        if logprobs and st.logprobs is not None:
            lps, st.logprobs = {"content": st.logprobs}, None
        if st.mode == "text":
            st.text = ""
        body = {k: v for k, v in chunk.items() if k != "choices"}
        body["choices"] = [{"index": chunk["choices"][0]["index"], "delta": delta,
                            "logprobs": lps, "finish_reason": finish}]
        return body
