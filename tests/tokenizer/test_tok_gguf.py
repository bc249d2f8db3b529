"""Tokenizer, chat template and streaming detokenizer against the real SmolLM2 GGUF, with
transformers (test-only) as the oracle."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenmill.tokenizer import (
    ChatTemplateError,
    GGUFTokenizerError,
    IncrementalDetokenizer,
    Tokenizer,
    tokenizer_from_folder,
    tokenizer_from_gguf,
)

_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2_gguf_path() -> Path:
    """The real SmolLM2 GGUF; the whole module skips if it is not on this machine."""
    path = Path.home() / ".cache" / "tokenmill" / _SMOLLM2_FILE
    if not path.is_file():
        pytest.skip(f"{path} not present")
    return path


@pytest.fixture(scope="module")
def tok(smollm2_gguf_path: Path) -> Tokenizer:
    return tokenizer_from_gguf(smollm2_gguf_path)


@pytest.fixture(scope="module")
def hf_tok(smollm2_gguf_path: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(
        str(smollm2_gguf_path.parent), gguf_file=smollm2_gguf_path.name
    )


TRICKY = [
    "a   b\t\t\n\n  c",
    "   leading spaces",
    "trailing spaces   ",
    " ",
    "\n",
    "Hello, world! It's a test; isn't it?",
    "emoji 😀👍🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 keycap 1️⃣",
    "中文文本，日本語のテキスト、한국어 텍스트",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    "Привет, мир! Ёлка",
    "def f(x):\n    if x:\n        return [i ** 2 for i in range(x)]\n\treturn None\n",
    "1234567890 3.14159 -42 1e10",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>",
    "text<|endoftext|>more",
    "",
    "ÿ\x00\x01 control \x7f chars \u200b zero width",
]


# --------------------------------------------------------------------- GGUF vs transformers


@pytest.mark.slow
@pytest.mark.parametrize("text", TRICKY)
def test_gguf_ids_match_transformers(tok: Tokenizer, hf_tok: Any, text: str) -> None:
    ours = tok.encode(text, add_special_tokens=False)
    assert ours == hf_tok.encode(text, add_special_tokens=False)
    assert tok.decode(ours, skip_special_tokens=False) == text
    assert tok.decode(ours, skip_special_tokens=True) == hf_tok.decode(
        ours, skip_special_tokens=True
    )


def test_gguf_metadata_and_special_tokens(tok: Tokenizer) -> None:
    assert tok.vocab_size == 49152
    assert (tok.bos_token, tok.bos_token_id) == ("<|im_start|>", 1)
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)
    assert tok.pad_token_id == 2
    assert tok.add_bos_token is False  # the file says so; encode must not add BOS
    assert tok.encode("hi") == tok.encode("hi", add_special_tokens=False)
    assert {0, 1, 2} <= tok.all_special_ids
    assert isinstance(tok.all_special_ids, frozenset)
    assert tok.chat_template is not None and "im_start" in tok.chat_template
    # Special-token text is parsed as the special token.
    assert tok.encode("<|im_end|>", add_special_tokens=False) == [2]
    assert tok.decode([1, *tok.encode("hi", add_special_tokens=False), 2]) == "hi"


def test_id_to_token_display(tok: Tokenizer) -> None:
    (paris,) = tok.encode(" Paris", add_special_tokens=False)
    assert tok.raw_token(paris) == "ĠParis"
    assert tok.id_to_token(paris) == " Paris"
    assert tok.id_to_token(2) == "<|im_end|>"
    assert tok.id_to_token(10**9) == ""


def test_gguf_errors_name_the_file(tmp_path: Path, smollm2_gguf_path: Path) -> None:
    missing = tmp_path / "missing.gguf"
    with pytest.raises(FileNotFoundError, match=r"missing\.gguf"):
        tokenizer_from_gguf(missing)
    not_gguf = tmp_path / "not_a_model.gguf"
    not_gguf.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(GGUFTokenizerError, match=r"not_a_model\.gguf"):
        tokenizer_from_gguf(not_gguf)
    truncated = tmp_path / "truncated.gguf"
    with smollm2_gguf_path.open("rb") as f:
        truncated.write_bytes(f.read(200_000))  # cut inside the token list
    with pytest.raises(ValueError, match=r"truncated\.gguf"):
        tokenizer_from_gguf(truncated)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.gguf"):
        tokenizer_from_gguf(empty)


class _FakeField:
    def __init__(self, value: Any) -> None:
        self._value = value

    def contents(self) -> Any:
        return self._value


class _FakeReader:
    def __init__(self, fields: dict[str, Any]) -> None:
        self.fields = {k: _FakeField(v) for k, v in fields.items()}


@pytest.mark.slow
@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "gpt-4o", "tekken"])
def test_pre_tokenizer_regexes_match_transformers(smollm2_gguf_path: Path, pre: str) -> None:
    """The same byte-level vocabulary under other `tokenizer.ggml.pre` values."""
    pytest.importorskip("transformers")
    from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer

    arch, tokenizer_dict, _ = get_gguf_tokenizer(str(smollm2_gguf_path))
    tokenizer_dict = dict(tokenizer_dict, pre_tokenizer_type=pre)
    hf_backend, _ = convert_gguf_tokenizer(arch, tokenizer_dict)
    fields = {
        "general.architecture": arch,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokenizer_dict["tokens"],
        "tokenizer.ggml.merges": tokenizer_dict["merges"],
        "tokenizer.ggml.token_type": tokenizer_dict["token_type"],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
    }
    ours = tokenizer_from_gguf(smollm2_gguf_path, reader=_FakeReader(fields))
    for text in [*TRICKY, "I'LL do it, we've 12345678 don't", "a\r\n\r\nb  \n  c"]:
        expected = hf_backend.encode(text, add_special_tokens=False).ids
        assert ours.encode(text, add_special_tokens=False) == expected, text


# --------------------------------------------------------------------- chat template parity

CONVERSATIONS = {
    "system_user": [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "What is the capital of France?"},
    ],
    "multi_turn": [
        {"role": "system", "content": "Be nice."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help? 😀"},
        {"role": "user", "content": "Tell me a joke about 猫."},
    ],
    "no_system": [{"role": "user", "content": "What is 2+2?"}],
    "none_values": [{"role": "user", "content": "hi", "name": None}],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(
    tok: Tokenizer, hf_tok: Any, name: str, add_generation_prompt: bool
) -> None:
    messages = CONVERSATIONS[name]
    ours = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    expected = hf_tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert ours == expected
    if name == "no_system":
        assert "You are a helpful AI assistant named SmolLM" in ours
    # The rendered prompt already holds its special tokens.
    ids = tok.encode(ours, add_special_tokens=False)
    assert ids[0] == tok.bos_token_id
    assert ids == hf_tok.encode(ours, add_special_tokens=False)


def test_no_chat_template_raises(tok: Tokenizer) -> None:
    bare = Tokenizer(
        tok.backend, bos_token=None, eos_token=None, add_bos_token=False, chat_template=None
    )
    with pytest.raises(ChatTemplateError, match="no chat template"):
        bare.apply_chat_template([{"role": "user", "content": "hi"}])


# --------------------------------------------------------------------- Hugging Face folder


@pytest.fixture(scope="module")
def hf_folder(hf_tok: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("hf_tokenizer")
    hf_tok.save_pretrained(str(folder))
    return folder


def _variant(base: Path, dest: Path, *, config: dict[str, Any] | None = None,
             post_processor: dict[str, Any] | None = None, drop_jinja: bool = False) -> Path:
    shutil.copytree(base, dest)
    if config is not None:
        cfg = json.loads((dest / "tokenizer_config.json").read_text())
        cfg.update(config)
        (dest / "tokenizer_config.json").write_text(json.dumps(cfg))
    if post_processor is not None:
        data = json.loads((dest / "tokenizer.json").read_text())
        data["post_processor"] = post_processor
        (dest / "tokenizer.json").write_text(json.dumps(data))
    if drop_jinja:
        (dest / "chat_template.jinja").unlink()
    return dest


_BOS_TEMPLATE = {
    "type": "TemplateProcessing",
    "single": [
        {"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
        {"Sequence": {"id": "A", "type_id": 0}},
    ],
    "pair": [
        {"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
        {"Sequence": {"id": "A", "type_id": 0}},
        {"Sequence": {"id": "B", "type_id": 1}},
    ],
    "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]}},
}


@pytest.mark.slow
@pytest.mark.parametrize(
    "variant", ["as_saved", "config_add_bos", "config_add_bos_and_eos", "post_processor_bos"]
)
def test_folder_matches_transformers(
    hf_folder: Path, tmp_path: Path, variant: str, tok: Tokenizer
) -> None:
    from transformers import AutoTokenizer

    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= {
        p.name for p in hf_folder.iterdir()
    }
    if variant == "as_saved":
        folder = hf_folder
    elif variant == "config_add_bos":
        folder = _variant(hf_folder, tmp_path / "v", config={"add_bos_token": True})
    elif variant == "config_add_bos_and_eos":
        folder = _variant(
            hf_folder, tmp_path / "v", config={"add_bos_token": True, "add_eos_token": True}
        )
    else:  # Llama-3 style: tokenizer.json's post-processor adds BOS, the config says nothing
        folder = _variant(hf_folder, tmp_path / "v", post_processor=_BOS_TEMPLATE)
    ours = tokenizer_from_folder(folder)
    theirs = AutoTokenizer.from_pretrained(str(folder))
    for text in TRICKY:
        for add in (True, False):
            assert ours.encode(text, add_special_tokens=add) == theirs.encode(
                text, add_special_tokens=add
            ), (variant, text, add)
    assert ours.encode_batch(TRICKY[:3]) == [ours.encode(t) for t in TRICKY[:3]]
    # transformers 5 ignores the config's add_bos_token/add_eos_token when tokenizer.json
    # exists: only tokenizer.json's post-processor adds anything.
    expect_bos = variant == "post_processor_bos"
    assert ours.add_bos_token is expect_bos
    assert (ours.encode("hi")[0] == 1) is expect_bos
    assert ours.encode("hi").count(1) <= 1  # never a double BOS
    assert ours.chat_template == tok.chat_template
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>"
    )


def test_folder_without_post_processor_follows_config(hf_folder: Path, tmp_path: Path) -> None:
    folder = _variant(hf_folder, tmp_path / "v", config={"add_bos_token": True})
    data = json.loads((folder / "tokenizer.json").read_text())
    data["post_processor"] = None
    (folder / "tokenizer.json").write_text(json.dumps(data))
    ours = tokenizer_from_folder(folder)
    assert ours.add_bos_token and not ours.add_eos_token
    plain = ours.encode("hi", add_special_tokens=False)
    assert ours.encode("hi") == [1, *plain]


def test_folder_chat_template_from_config_list(hf_folder: Path, tmp_path: Path, tok: Tokenizer) -> None:
    assert tok.chat_template is not None
    folder = _variant(
        hf_folder,
        tmp_path / "v",
        config={
            "chat_template": [
                {"name": "tool_use", "template": "TOOLS{{ tools | tojson }}"},
                {"name": "default", "template": tok.chat_template},
            ],
            "bos_token": {"content": "<|im_start|>", "special": True},
        },
        drop_jinja=True,
    )
    ours = tokenizer_from_folder(folder)
    assert ours.chat_template == tok.chat_template
    assert ours.bos_token == "<|im_start|>"
    msgs = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(msgs) == tok.apply_chat_template(msgs)
    tools = [{"name": "get_weather", "description": "Météo"}]
    assert ours.apply_chat_template(msgs, tools=tools) == 'TOOLS[{"name": "get_weather", "description": "Météo"}]'


def test_folder_missing_tokenizer_json(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        tokenizer_from_folder(tmp_path)


# --------------------------------------------------------------------- detokenizer


def _stream(tok: Tokenizer, ids: list[int], chunk: int = 1, **kwargs: Any) -> tuple[list[str], str, IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tok, **kwargs)
    deltas = [detok.step(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    tail = detok.flush()
    return deltas, tail, detok


def test_detok_utf8_safety_single_tokens(tok: Tokenizer) -> None:
    text = "日本語のテキスト 😀👍🏽 👨‍👩‍👧‍👦 🇫🇷 नमस्ते 中文"
    ids = tok.encode(text, add_special_tokens=False)
    # The vocabulary really splits these characters across tokens.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    deltas, tail, detok = _stream(tok, ids)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + tail == text
    assert detok.text == text
    assert not detok.stopped


def test_detok_skips_special_tokens(tok: Tokenizer) -> None:
    ids = tok.encode("<|im_start|>assistant\nHi there<|im_end|>", add_special_tokens=False)
    deltas, tail, _ = _stream(tok, ids)
    assert "".join(deltas) + tail == "assistant\nHi there"
    deltas, tail, _ = _stream(tok, ids, skip_special_tokens=False)
    assert "".join(deltas) + tail == "<|im_start|>assistant\nHi there<|im_end|>"


def test_detok_stop_string_across_tokens(tok: Tokenizer) -> None:
    ids = tok.encode("The capital of France is Paris. It is big.", add_special_tokens=False)
    assert "Paris." not in [tok.decode([i]) for i in ids]  # spans a token boundary
    deltas, tail, detok = _stream(tok, ids, stop=["Paris."])
    assert detok.stopped and detok.stop_reason == "Paris."
    assert "".join(deltas) + tail == "The capital of France is "
    assert detok.text == "The capital of France is "
    assert detok.step(tok.encode(" more", add_special_tokens=False)) == ""

    deltas, tail, detok = _stream(tok, ids, stop=["Paris.", "xyz"], include_stop_str_in_output=True)
    assert "".join(deltas) + tail == "The capital of France is Paris."
    assert detok.stop_reason == "Paris."
    # The earliest stop string to appear wins.
    _, _, detok = _stream(tok, ids, stop=["big", "capital of"])
    assert detok.stop_reason == "capital of" and detok.text == "The "


def test_detok_holds_back_partial_stop_then_flushes(tok: Tokenizer) -> None:
    ids = tok.encode("The answer is Paris", add_special_tokens=False)
    deltas, tail, detok = _stream(tok, ids, stop=["Paris!"])
    assert "".join(deltas) == "The answer is "
    assert tail == "Paris"
    assert not detok.stopped and detok.text == "The answer is Paris"
    # A held-back prefix that turns out not to be a stop string is released by the next step.
    detok = IncrementalDetokenizer(tok, stop=["Paris!"])
    out = "".join(detok.step([i]) for i in ids)
    out += detok.step(tok.encode(" and Rome", add_special_tokens=False))
    assert out == "The answer is Paris and Rome"


def test_detok_stop_string_inside_emoji_stream(tok: Tokenizer) -> None:
    ids = tok.encode("好的😀再见😀", add_special_tokens=False)
    deltas, tail, detok = _stream(tok, ids, stop=["再见"])
    assert detok.stopped and "".join(deltas) + tail == "好的😀"
    assert all("\ufffd" not in d for d in deltas)


@pytest.fixture(scope="module")
def interesting_ids(tok: Tokenizer) -> list[int]:
    """Tokens that produce partial UTF-8 (emoji / CJK bytes), CJK text, spaces and specials."""
    text = "😀👍🏽👨‍👩‍👧‍👦🇫🇷日本語のテキスト中文한국어 नमस्ते Привет  \n\t ."
    ids = set(tok.encode(text, add_special_tokens=False))
    ids |= {i for i in range(tok.vocab_size) if len(tok.decode([i])) == 1 and tok.decode([i]) == "\ufffd"}
    ids |= {0, 1, 2}
    return sorted(ids)


@pytest.mark.slow
def test_detok_matches_full_decode_property(tok: Tokenizer, interesting_ids: list[int]) -> None:
    token = st.one_of(st.integers(0, tok.vocab_size - 1), st.sampled_from(interesting_ids))

    @settings(
        max_examples=100,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(
        ids=st.lists(token, max_size=20),
        prompt=st.lists(token, max_size=6),
        chunk=st.integers(1, 3),
        skip=st.booleans(),
    )
    def check(ids: list[int], prompt: list[int], chunk: int, skip: bool) -> None:
        full = tok.decode(ids, skip_special_tokens=skip)
        deltas, tail, detok = _stream(
            tok, ids, chunk=chunk, skip_special_tokens=skip, prompt_token_ids=prompt
        )
        assert "".join(deltas) + tail == full
        assert detok.text == full
        if "\ufffd" not in full:
            assert all("\ufffd" not in d for d in deltas)

    check()


@pytest.mark.slow
def test_detok_stop_strings_property(tok: Tokenizer, interesting_ids: list[int]) -> None:
    token = st.one_of(st.integers(0, tok.vocab_size - 1), st.sampled_from(interesting_ids))

    @settings(
        max_examples=60,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(
        ids=st.lists(token, min_size=1, max_size=16),
        cuts=st.lists(st.tuples(st.integers(0, 200), st.integers(1, 6)), min_size=1, max_size=3),
        include=st.booleans(),
    )
    def check(ids: list[int], cuts: list[tuple[int, int]], include: bool) -> None:
        full = tok.decode(ids)
        stops = [full[a % max(len(full), 1) :][:n] for a, n in cuts]
        stops = [s for s in stops if s]
        deltas, tail, detok = _stream(tok, ids, stop=stops, include_stop_str_in_output=include)
        out = "".join(deltas) + tail
        hits = [(full.find(s) + len(s), full.find(s), s) for s in stops if s in full]
        if not hits:
            assert out == full and not detok.stopped
            return
        end, start, _stop = min(hits, key=lambda h: (h[0], h[1]))
        assert detok.stopped
        assert out == (full[:end] if include else full[:start])
        assert detok.stop_reason is not None and full[start:end] == detok.stop_reason

    check()
