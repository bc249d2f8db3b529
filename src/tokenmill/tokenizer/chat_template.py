"""Rendering chat templates (Jinja) safely, the way transformers 5.x does.

Chat templates ship inside model files, so they are untrusted code. They run in jinja2's
``ImmutableSandboxedEnvironment`` (which blocks attribute escapes such as ``__subclasses__``)
configured exactly like transformers' ``utils/chat_template_utils.py`` (``trim_blocks``,
``lstrip_blocks``, ``loopcontrols``, a non-HTML-escaping ``tojson``, ``raise_exception``,
``strftime_now``, a restricted ``dict`` and ``namespace``), so the rendered text is
byte-identical to ``tokenizer.apply_chat_template(..., tokenize=False)``.

On top of the sandbox, rendering is bounded:

* a wall-clock limit (default 1 s): the template renders on a worker thread, and at the deadline
  an exception is injected into that thread (``PyThreadState_SetAsyncExc``), which stops any
  template made of loops, however deeply nested;
* a size cap on the results of ``*``, ``**``, ``+`` and ``%``, on the string methods and filters
  that pad or replace (``ljust``, ``center``, ``replace``, ``indent``, ...), on macro arguments
  and on values stored in a ``namespace``, so that a single C-level operation cannot allocate
  gigabytes before the deadline fires (``'x' * 10**9`` is refused at once);
* a cap on the size of the rendered output (default 4,000,000 characters).

Every failure -- a template syntax error, ``raise_exception``, a sandbox violation, a limit, any
other exception raised while rendering -- comes out as :class:`ChatTemplateError`.
"""

from __future__ import annotations

import ctypes
import functools
import json
import re
import threading
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.filters
import jinja2.nodes
import jinja2.parser
import jinja2.utils
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = [
    "DEFAULT_MAX_OUTPUT_CHARS",
    "DEFAULT_RENDER_TIMEOUT_S",
    "MAX_VALUE_SIZE",
    "ChatTemplateError",
    "render_chat_template",
]

DEFAULT_RENDER_TIMEOUT_S = 1.0
DEFAULT_MAX_OUTPUT_CHARS = 4_000_000
# Largest string / list / dict a single template operation may produce.
MAX_VALUE_SIZE = 1_000_000
# Largest integer (in bits) `*` and `**` may produce.
_MAX_INT_BITS = 100_000

_TIMEOUT_MESSAGE = "chat template rendering exceeded the time limit"

# Names a message's reasoning is passed under; transformers copies the first one found to
# `reasoning_content` and `thinking`, which is what templates read.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(ValueError):
    """The chat template is missing, does not compile, raised, or broke a sandbox limit."""


class _RenderTimeout(BaseException):
    """Injected into the render thread at the deadline (BaseException: templates cannot catch it)."""


def _refuse(what: str) -> SecurityError:
    return SecurityError(f"chat template refused: {what} (limit {MAX_VALUE_SIZE:,} items)")


def _size(value: Any) -> int:
    if isinstance(value, (str, bytes, list, tuple, dict, set, frozenset)):
        return len(value)
    return 0


def _check_size(value: Any, what: str) -> Any:
    if _size(value) > MAX_VALUE_SIZE:
        raise _refuse(what)
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > _MAX_INT_BITS:
        raise SecurityError(f"chat template refused: {what} gives an integer over {_MAX_INT_BITS} bits")
    return value


def _check_width(width: Any, what: str) -> None:
    if isinstance(width, int) and not isinstance(width, bool) and width > MAX_VALUE_SIZE:
        raise _refuse(what)


_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-+ #0]*(\*|\d+)?(?:\.(\*|\d+))?")
_BRACE_NUMBER = re.compile(r"\{[^{}]*?(\d{7,})[^{}]*\}")


def _check_percent_format(fmt: str, args: Any) -> None:
    """Refuse `'%0999999999d' % 1` and `'%*d' % (10**9, 1)` before they allocate."""
    for match in _PERCENT_SPEC.finditer(fmt):
        for number in match.groups():
            if number and number != "*" and int(number) > MAX_VALUE_SIZE:
                raise _refuse("a %-format width")
    if "*" in fmt:
        values = args if isinstance(args, tuple) else (args,)
        for value in values:
            _check_width(value, "a %-format width")


def _estimate_replace(s: str, old: str, new: str, count: int | None = None) -> None:
    if len(new) <= len(old):
        return
    occurrences = s.count(old) if old else len(s) + 1
    if count is not None and count >= 0:
        occurrences = min(occurrences, count)
    if len(s) + occurrences * (len(new) - len(old)) > MAX_VALUE_SIZE:
        raise _refuse("str.replace result")


def _check_str_method_call(method: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Pre-checks for the `str` methods whose result can be far larger than their inputs."""
    wrapped = getattr(method, "__wrapped__", method)  # the sandbox wraps str.format
    owner = getattr(wrapped, "__self__", None)
    if not isinstance(owner, str):
        return
    name = getattr(wrapped, "__name__", "")
    if name in ("ljust", "rjust", "center", "zfill"):
        for value in (*args, *kwargs.values()):
            _check_width(value, f"str.{name} width")
    elif name == "expandtabs":
        for value in (*args, *kwargs.values()):
            if isinstance(value, int) and value * max(owner.count("\t"), 1) > MAX_VALUE_SIZE:
                raise _refuse("str.expandtabs result")
    elif name == "replace" and len(args) >= 2:
        count = args[2] if len(args) > 2 else kwargs.get("count")
        _estimate_replace(owner, str(args[0]), str(args[1]), count)
    elif name in ("format", "format_map"):
        if _BRACE_NUMBER.search(owner):
            raise _refuse("a format width")
        for value in (*args, *kwargs.values()):
            _check_width(value, "a format width")


class _GuardedEnvironment(ImmutableSandboxedEnvironment):
    """The immutable sandbox, plus size checks on operators and calls."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if _size(seq) and isinstance(times, int) and _size(seq) * times > MAX_VALUE_SIZE:
                    raise _refuse("repetition with *")
            both_int = isinstance(left, int) and isinstance(right, int)
            if both_int and left.bit_length() + right.bit_length() > _MAX_INT_BITS:
                raise SecurityError("chat template refused: integer product too large")
        elif operator == "**":
            both_int = isinstance(left, int) and isinstance(right, int)
            if both_int and abs(left) > 1 and right > 0 and left.bit_length() * right > _MAX_INT_BITS:
                raise SecurityError("chat template refused: exponent too large")
        elif operator == "+":
            if _size(left) + _size(right) > MAX_VALUE_SIZE:
                raise _refuse("concatenation with +")
        elif operator == "%" and isinstance(left, str):
            _check_percent_format(left, right)
        return _check_size(super().call_binop(context, operator, left, right), f"operator {operator}")

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        # jinja returns an Undefined that only fails when used; fail at once instead (no
        # legitimate chat template reads underscore or internal attributes).
        raise SecurityError(
            f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is unsafe"
        )

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        for value in (*args, *kwargs.values()):
            if _size(value) > MAX_VALUE_SIZE:
                raise _refuse("call argument")
        _check_str_method_call(__obj, args, kwargs)
        result = super().call(__context, __obj, *args, **kwargs)
        if isinstance(result, (str, list, tuple, dict)):
            _check_size(result, "call result")
        return result


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` renders its body unchanged (transformers uses it
    to find the assistant tokens for training masks; a server has no use for that)."""

    tags = {"generation"}  # noqa: RUF012 -- jinja's own class attribute

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message: Any) -> None:
    raise ChatTemplateError(str(message))


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # transformers' version: no HTML escaping, plus indent/separators/sort_keys.
    if isinstance(indent, int) and not isinstance(indent, bool) and indent > 64:
        raise SecurityError("chat template refused: tojson indent over 64")
    if isinstance(indent, str) and len(indent) > 64:
        raise SecurityError("chat template refused: tojson indent over 64 characters")
    return _check_size(
        json.dumps(
            value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        ),
        "tojson result",
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _TemplateDict:
    """`dict(...)` for templates, without exposing the `dict` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace(...)` refusing underscore names, and values over the size cap."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # jinja's signature trick
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name, value in attrs.items():
            _TemplateNamespace._check(name, value)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check(name, value)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any, value: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(
                f"chat templates cannot store underscore-prefixed attributes on a namespace: {name!r}"
            )
        _check_size(value, "namespace value")


def _guarded_filter(name: str, check: Callable[..., None]) -> Callable[..., Any]:
    original = jinja2.filters.FILTERS[name]

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        check(*args, **kwargs)
        return original(*args, **kwargs)

    return wrapper


def _center_check(value: Any, width: Any = 80) -> None:
    _check_width(width, "center width")


def _indent_check(s: Any, width: Any = 4, *_: Any, **__: Any) -> None:
    per_line = len(width) if isinstance(width, str) else width
    if isinstance(per_line, int) and per_line * (str(s).count("\n") + 2) > MAX_VALUE_SIZE:
        raise _refuse("indent result")


def _replace_check(_ctx: Any, s: Any, old: Any, new: Any, count: Any = None) -> None:
    _estimate_replace(str(s), str(old), str(new), count)


def _format_check(value: Any, *args: Any, **kwargs: Any) -> None:
    _check_percent_format(str(value), kwargs or args)


@functools.lru_cache(maxsize=1)
def _environment() -> _GuardedEnvironment:
    env = _GuardedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols, _GenerationBlock],
    )
    env.filters["tojson"] = _tojson
    env.filters["center"] = _guarded_filter("center", _center_check)
    env.filters["indent"] = _guarded_filter("indent", _indent_check)
    env.filters["replace"] = _guarded_filter("replace", _replace_check)
    env.filters["format"] = _guarded_filter("format", _format_check)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    return _environment().from_string(template)


def compile_chat_template(template: str) -> jinja2.Template:
    """Compile (cached per template string); raises ChatTemplateError on a syntax error."""
    try:
        return _compile(template)
    except TemplateError as exc:
        raise ChatTemplateError(f"chat template does not compile: {exc}") from exc


def _plain(value: Any) -> Any:
    """Rebuild template inputs from plain JSON-like types (as transformers does): the template
    only ever sees str/int/float/bool/None/dict/list/tuple; anything else becomes '<TypeName>'."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return _plain(dump())
    return f"<{type(value).__name__}>"


def _prepare_messages(messages: Any) -> list[dict[str, Any]]:
    prepared = []
    for message in messages:
        if not isinstance(message, Mapping):
            raise ChatTemplateError(f"chat messages must be dicts, got {type(message).__name__}")
        # transformers drops None values (OpenAI clients send content=None, tool_calls=None).
        plain = {k: v for k, v in _plain(message).items() if v is not None}
        reasoning = next((plain[k] for k in _REASONING_FIELDS if plain.get(k) is not None), None)
        if reasoning is not None:
            plain = {"thinking": reasoning, **plain, "reasoning_content": reasoning}
        prepared.append(plain)
    return prepared


def _render_capped(template: jinja2.Template, variables: dict[str, Any], max_chars: int) -> str:
    parts: list[str] = []
    total = 0
    for chunk in template.generate(**variables):
        total += len(chunk)
        if total > max_chars:
            raise ChatTemplateError(
                f"chat template output exceeded the size limit of {max_chars:,} characters"
            )
        parts.append(chunk)
    return "".join(parts)


def _run_with_deadline(fn: Callable[[], str], timeout_s: float) -> str:
    outcome: dict[str, Any] = {}
    done = threading.Event()

    def target() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc
        finally:
            done.set()

    worker = threading.Thread(target=target, name="tokenmill-chat-template", daemon=True)
    worker.start()
    if not done.wait(timeout_s):
        ident = worker.ident
        if ident is not None and not done.is_set():
            ctypes.pythonapi.PyThreadState_SetAsyncExc(
                ctypes.c_ulong(ident), ctypes.py_object(_RenderTimeout)
            )
        # Give the injected exception a moment to unwind the render; if the thread is stuck in a
        # C call it is abandoned (daemon), and the caller still gets its error now.
        done.wait(0.1)
        if "value" not in outcome:
            raise ChatTemplateError(_TIMEOUT_MESSAGE)
    if "error" in outcome:
        raise outcome["error"]
    return str(outcome["value"])


def render_chat_template(
    template: str | None,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None,
    documents: list[dict[str, Any]] | None = None,
    special_tokens: Mapping[str, str | None] | None = None,
    timeout_s: float | None = DEFAULT_RENDER_TIMEOUT_S,
    max_output_chars: int = DEFAULT_MAX_OUTPUT_CHARS,
    **kwargs: Any,
) -> str:
    """Render `template` for `messages`, like transformers' ``apply_chat_template(tokenize=False)``.

    Template variables: ``messages``, ``tools``, ``documents``, ``add_generation_prompt``, every
    entry of `special_tokens` (``bos_token``, ``eos_token``, ... ; None values left out) and the
    extra `kwargs` (which win over special tokens of the same name, as in transformers).

    `timeout_s` caps the render's wall-clock time (None renders inline with no cap, for trusted
    templates); `max_output_chars` caps the output. Raises ChatTemplateError on any failure.
    """
    if not template:
        raise ChatTemplateError(
            "this model has no chat template; send a plain prompt or configure a template"
        )
    if tools is not None and not all(isinstance(t, Mapping) for t in tools):
        raise ChatTemplateError("tools must be a list of JSON-schema dicts")
    if documents is not None and not all(isinstance(d, Mapping) for d in documents):
        raise ChatTemplateError("documents must be a list of dicts")
    compiled = compile_chat_template(template)
    variables: dict[str, Any] = {
        k: v for k, v in (special_tokens or {}).items() if v is not None
    }
    variables.update(_plain(kwargs))
    variables.update(
        messages=_prepare_messages(messages),
        tools=_plain(tools),
        documents=_plain(documents),
        add_generation_prompt=add_generation_prompt,
    )

    def render() -> str:
        return _render_capped(compiled, variables, max_output_chars)

    try:
        if timeout_s is None:
            return render()
        return _run_with_deadline(render, timeout_s)
    except ChatTemplateError:
        raise
    except _RenderTimeout as exc:
        raise ChatTemplateError(_TIMEOUT_MESSAGE) from exc
    except TemplateError as exc:
        raise ChatTemplateError(exc.message or str(exc)) from exc
    except (Exception, RecursionError) as exc:  # MemoryError, TypeError, ... from the template
        raise ChatTemplateError(f"chat template failed: {type(exc).__name__}: {exc}") from exc
