"""Chat template rendering: transformers-compatible features and the sandbox limits."""

from __future__ import annotations

import time

import pytest

from tokenmill.tokenizer import ChatTemplateError, compile_chat_template, render_chat_template

MSGS = [{"role": "user", "content": "hi"}]


def render(template: str, **kwargs: object) -> str:
    return render_chat_template(template, MSGS, **kwargs)  # type: ignore[arg-type]


def assert_refused_quickly(template: str, match: str | None = None, limit_s: float = 0.5) -> None:
    start = time.monotonic()
    with pytest.raises(ChatTemplateError, match=match):
        render(template, timeout_s=5.0)
    assert time.monotonic() - start < limit_s


# --------------------------------------------------------------------- features


def test_basic_variables_and_trim_blocks() -> None:
    template = (
        "{{ bos_token }}\n"
        "{% for m in messages %}\n"
        "  {{ m.role }}: {{ m.content }}\n"
        "{% endfor %}\n"
        "{% if add_generation_prompt %}GEN{% endif %}"
    )
    out = render_chat_template(
        template, MSGS, special_tokens={"bos_token": "<s>", "eos_token": None}
    )
    assert out == "<s>\n  user: hi\nGEN"  # lstrip_blocks strips before tags only
    out = render_chat_template(template, MSGS, add_generation_prompt=False, special_tokens={})
    assert out == "\n  user: hi\n"


def test_tojson_like_transformers() -> None:
    tools = [{"name": "météo", "parameters": {"b": 1, "a": [1, 2]}}]
    assert (
        render_chat_template("{{ tools | tojson }}", MSGS, tools=tools)
        == '[{"name": "météo", "parameters": {"b": 1, "a": [1, 2]}}]'
    )
    out = render_chat_template("{{ tools[0] | tojson(indent=2, sort_keys=True) }}", MSGS, tools=tools)
    assert out.startswith('{\n  "name": "météo"') and out.index('"a"') < out.index('"b"')
    assert render("{{ '<b>&' | tojson }}") == '"<b>&"'  # no HTML escaping
    out = render_chat_template("{{ x | tojson(separators=(',', ':')) }}", MSGS, x={"k": [1]})
    assert out == '{"k":[1]}'


def test_kwargs_documents_and_loopcontrols() -> None:
    template = (
        "{% for d in documents %}{% if loop.index > 1 %}{% break %}{% endif %}"
        "{{ d.title }}{% endfor %}|{{ custom }}|{{ bos_token }}"
    )
    out = render_chat_template(
        template,
        MSGS,
        documents=[{"title": "A"}, {"title": "B"}],
        special_tokens={"bos_token": "<s>"},
        custom="yes",
        bos_token="<override>",  # kwargs win over special tokens, as in transformers
    )
    assert out == "A|yes|<override>"


def test_generation_block_is_transparent() -> None:
    template = "{% for m in messages %}{% generation %}[{{ m.content }}]{% endgeneration %}{% endfor %}"
    assert render(template) == "[hi]"


def test_strftime_namespace_and_dict() -> None:
    year = time.strftime("%Y")
    assert render("{{ strftime_now('%Y') }}") == year
    template = (
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
        "{% endfor %}{{ ns.n }}{{ dict(a=1)['a'] }}"
    )
    assert render(template) == "11"
    with pytest.raises(ChatTemplateError):
        render("{% set ns = namespace(_x=1) %}")


def test_messages_are_plain_data() -> None:
    class Weird(str):
        def evil(self) -> str:
            return "pwned"

    msgs = [{"role": "user", "content": Weird("hi"), "tool_calls": None, "thinking": "hmm"}]
    out = render_chat_template(
        "{% for m in messages %}{{ m.content.evil is defined }}{{ m.tool_calls is defined }}"
        "{{ m.reasoning_content }}{% endfor %}",
        msgs,  # type: ignore[arg-type]
    )
    assert out == "FalseFalsehmm"


def test_raise_exception_message() -> None:
    with pytest.raises(ChatTemplateError) as info:
        render("{{ raise_exception('bad') }}")
    assert str(info.value) == "bad"
    assert isinstance(info.value, ValueError)


def test_syntax_error_and_missing_template() -> None:
    with pytest.raises(ChatTemplateError, match="does not compile"):
        render("{% for %}")
    with pytest.raises(ChatTemplateError, match="no chat template"):
        render_chat_template(None, MSGS)
    with pytest.raises(ChatTemplateError):
        render("{{ messages[5].content.upper() }}")  # undefined -> error, not a crash


def test_compiled_once_per_template() -> None:
    template = "{{ messages | length }} cached"
    assert compile_chat_template(template) is compile_chat_template(template)


def test_no_timeout_renders_inline() -> None:
    assert render("{{ messages[0].content }}", timeout_s=None) == "hi"


# --------------------------------------------------------------------- sandbox


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__.__base__.__subclasses__() }}",
        "{{ raise_exception.__globals__ }}",
        "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
        "{{ ''.format.__globals__ }}",
        "{{ '{0.__class__.__mro__}'.format('') }}",
        "{{ self._TemplateReference__context }}",
        "{{ messages.append(1) }}",
    ],
)
def test_ssti_is_blocked(template: str) -> None:
    with pytest.raises(ChatTemplateError):
        render(template)


def test_nested_loops_stop_at_the_deadline() -> None:
    template = "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}"
    start = time.monotonic()
    with pytest.raises(ChatTemplateError, match="time limit"):
        render(template, timeout_s=0.5, max_output_chars=10**12)
    assert time.monotonic() - start < 1.0


def test_busy_loop_without_output_stops_at_the_deadline() -> None:
    template = (
        "{% set ns = namespace(n=0) %}"
        "{% for i in range(100000) %}{% for j in range(100000) %}{% set ns.n = ns.n + 1 %}"
        "{% endfor %}{% endfor %}{{ ns.n }}"
    )
    start = time.monotonic()
    with pytest.raises(ChatTemplateError, match="time limit"):
        render(template, timeout_s=0.3)
    assert time.monotonic() - start < 0.6


def test_range_cap_is_kept() -> None:
    with pytest.raises(ChatTemplateError):
        render("{% for i in range(10**7) %}{% endfor %}")


@pytest.mark.parametrize(
    "template",
    [
        "{{ 'x' * 10**9 }}",
        "{{ 10**9 * 'x' }}",
        "{{ ['x'] * 10**9 }}",
        "{{ 2 ** (10**9) }}",
        "{{ '%0999999999d' % 1 }}",
        "{{ '%*d' % (999999999, 1) }}",
        "{{ '%0999999999d' | format(1) }}",
        "{{ 'x' | center(999999999) }}",
        "{{ 'x'.ljust(999999999) }}",
        "{{ '{:>999999999}'.format(1) }}",
        "{{ 'ab' | indent(999999999, first=true) }}",
        "{{ ('x' * 1000) | replace('x', 'y' * 2000) }}",
        "{{ ('x' * 1000).replace('x', 'y' * 2000) }}",
        "{{ messages | tojson(indent=10**9) }}",
        "{% set ns = namespace(s='xxxxxxxxxx') %}{% for i in range(40) %}"
        "{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
        "{% set ns = namespace(s='xxxxxxxxxx') %}{% for i in range(40) %}"
        "{% set ns.s = ns.s + ns.s %}{% endfor %}",
        "{% macro f(s, n) %}{% if n %}{{ f(s ~ s, n - 1) }}{% endif %}{% endmacro %}{{ f('x', 40) }}",
    ],
)
def test_huge_values_are_refused_quickly(template: str) -> None:
    assert_refused_quickly(template)


def test_output_size_cap() -> None:
    template = "{% for i in range(100000) %}{{ 'y' * 100 }}{% endfor %}"
    with pytest.raises(ChatTemplateError, match="size limit"):
        render(template, max_output_chars=1_000_000)
    assert len(render("{% for i in range(100) %}{{ 'y' * 100 }}{% endfor %}")) == 10_000


def test_small_operators_still_work() -> None:
    template = "{{ '=' * 3 }}{{ 2 ** 10 }}{{ 'a' + 'b' }}{{ '%03d' % 7 }}{{ [1] * 2 }}{{ 7 % 3 }}"
    assert render(template) == "===1024ab007[1, 1]1"
    assert render("{{ 'ab'.replace('a', 'xyz') }}{{ 'x' | center(5) }}|") == "xyzb  x  |"
