"""SentencePiece (`tokenizer.ggml.model = "llama"`) GGUF tokenizers, on small synthetic files
written with gguf.GGUFWriter, against transformers' GGUF converter (test-only oracle)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tokenmill.tokenizer import IncrementalDetokenizer, Tokenizer, tokenizer_from_gguf

gguf = pytest.importorskip("gguf")

CORPUS = """The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away.
Tokenizers split text into pieces, and pieces into ids. Hello world! hello again, world.
def tokenize(text):\n    return [piece for piece in text.split()]\n
Numbers 12345 and 67890 appear, as do symbols like #, @, %, and & in the text."""

TEXTS = [
    "The quick brown fox",
    "  leading and trailing spaces  ",
    "hello world\n\nnew paragraph\ttab",
    "def f(x):\n    return x",
    "unseen characters: 😀 日本 Ω",
    "<s>text with a control token</s> inside",
    "<think>user defined</think> token",
    "",
    " ",
]


def _vocab() -> tuple[list[str], list[float], list[int]]:
    tokens = ["<unk>", "<s>", "</s>", "<think>"]
    types = [2, 3, 3, 4]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    chars = sorted({c for c in CORPUS.replace(" ", "\u2581")} | {"\u2581"})
    counts: Counter[str] = Counter()
    for word in CORPUS.split():
        piece = "\u2581" + word
        for n in range(2, 8):
            for i in range(len(piece) - n + 1):
                counts[piece[i : i + n]] += n
    pieces = [p for p, _ in counts.most_common(500) if p not in chars]
    normal = chars + pieces
    tokens += normal
    types += [1] * len(normal)
    scores = [0.0] * (len(tokens) - len(normal)) + [-float(i) for i in range(len(normal))]
    return tokens, scores, types


def _write_gguf(path: Path, arch: str = "llama", **options: Any) -> Path:
    tokens, scores, types = _vocab()
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    if "add_bos" in options:
        writer.add_add_bos_token(options["add_bos"])
    if "add_space_prefix" in options:
        writer.add_add_space_prefix(options["add_space_prefix"])
    writer.add_chat_template("{% for m in messages %}[{{ m.content }}]{% endfor %}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_gguf(tmp_path_factory.mktemp("sp") / "sp.gguf")


@pytest.fixture(scope="module")
def sp_tok(sp_path: Path) -> Tokenizer:
    return tokenizer_from_gguf(sp_path)


@pytest.fixture(scope="module")
def hf_backend(sp_path: Path) -> Any:
    pytest.importorskip("transformers")
    from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer

    arch, tokenizer_dict, _ = get_gguf_tokenizer(str(sp_path))
    backend, _ = convert_gguf_tokenizer(arch, tokenizer_dict)
    return backend


@pytest.mark.parametrize("text", TEXTS)
def test_sentencepiece_matches_transformers(sp_tok: Tokenizer, hf_backend: Any, text: str) -> None:
    ids = sp_tok.encode(text, add_special_tokens=False)
    assert ids == hf_backend.encode(text, add_special_tokens=False).ids
    for skip in (True, False):
        assert sp_tok.decode(ids, skip_special_tokens=skip) == hf_backend.decode(
            ids, skip_special_tokens=skip
        )
    # Metaspace adds no "▁" to text already starting with a space, yet the decoder strips one:
    # such texts lose a space, in transformers too.
    if "<s>" not in text and not text.startswith(" "):
        assert sp_tok.decode(ids, skip_special_tokens=False) == text


def test_sentencepiece_bos_default_and_specials(sp_tok: Tokenizer) -> None:
    # No add_bos_token in the file: llama.cpp adds BOS for SentencePiece vocabularies.
    assert sp_tok.add_bos_token
    assert sp_tok.encode("hello")[0] == 1
    assert sp_tok.encode("hello", add_special_tokens=False)[0] != 1
    assert {0, 1, 2} <= sp_tok.all_special_ids
    assert 3 not in sp_tok.all_special_ids  # <think> is USER_DEFINED: whole, not special
    assert sp_tok.encode("<think>", add_special_tokens=False) == [3]
    (fox,) = [i for i in sp_tok.encode(" fox", add_special_tokens=False) if i > 3][-1:]
    assert sp_tok.id_to_token(fox).startswith(" ")
    assert sp_tok.apply_chat_template([{"role": "user", "content": "x"}]) == "[x]"


def test_sentencepiece_file_flags_are_followed(tmp_path: Path) -> None:
    tok = tokenizer_from_gguf(
        _write_gguf(tmp_path / "flags.gguf", add_bos=False, add_space_prefix=False)
    )
    assert not tok.add_bos_token
    with_prefix = tokenizer_from_gguf(_write_gguf(tmp_path / "prefix.gguf"))
    assert tok.encode("hello") != with_prefix.encode("hello", add_special_tokens=False)
    assert tok.decode(tok.encode(" hello")) == " hello"


@pytest.mark.parametrize("arch", ["gemma3", "phi3"])
def test_sentencepiece_arch_variants_match_transformers(tmp_path: Path, arch: str) -> None:
    pytest.importorskip("transformers")
    from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer

    path = _write_gguf(tmp_path / f"{arch}.gguf", arch=arch)
    ours = tokenizer_from_gguf(path)
    backend, _ = convert_gguf_tokenizer(*get_gguf_tokenizer(str(path))[:2])
    for text in TEXTS:
        ids = ours.encode(text, add_special_tokens=False)
        assert ids == backend.encode(text, add_special_tokens=False).ids, text
        assert ours.decode(ids) == backend.decode(ids, skip_special_tokens=True), text


def test_sentencepiece_stream_keeps_spaces(sp_tok: Tokenizer) -> None:
    text = "The dog sleeps 😀 and the fox runs"
    ids = sp_tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(sp_tok)
    deltas = [detok.step([i]) for i in ids]
    assert "".join(deltas) + detok.flush() == sp_tok.decode(ids) == text
    assert all("\ufffd" not in d for d in deltas)
    # Special tokens between words must not eat the following space.
    with_eos = [ids[0], 2, *ids[1:]]
    detok = IncrementalDetokenizer(sp_tok)
    out = "".join(detok.step([i]) for i in with_eos) + detok.flush()
    assert out == sp_tok.decode(with_eos) == text
    # With prompt context, the first token keeps its leading space (as TGI/vLLM stream it).
    prompt = sp_tok.encode("Say:", add_special_tokens=False)
    first = sp_tok.encode("Say: dog", add_special_tokens=False)[len(prompt) :]
    detok = IncrementalDetokenizer(sp_tok, prompt_token_ids=prompt)
    assert "".join(detok.step([i]) for i in first) + detok.flush() == " dog"
