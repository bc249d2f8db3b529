"""Building a `tokenizers` tokenizer from a GGUF file's metadata, without transformers.

A port of transformers' ``integrations/gguf/gguf_tokenizer_mapping.py`` (5.x), which hands the
metadata to its GPT2/Llama/Gemma tokenizer classes; here the same `tokenizers` pipelines are
built directly:

* ``tokenizer.ggml.model = "gpt2"``: byte-level BPE from the file's tokens and merges, with the
  split regex chosen by ``tokenizer.ggml.pre`` (llama3/llama-bpe, qwen2, tekken, gpt-4o, ...;
  anything else, e.g. ``smollm``/``default``, uses the GPT-2 regex of ByteLevel).
* ``"llama"`` (SentencePiece): BPE with byte fallback, the merges taken from the file or rebuilt
  from the token scores, ``▁`` Metaspace pre-tokenization (prepend on the first word only,
  transformers' non-legacy behaviour) and the matching decoder. Gemma and Phi-3 files get their
  own variants, picked by ``general.architecture``, as in transformers.
* Token type 3 (CONTROL) tokens become special added tokens, type 4 (USER_DEFINED) plain added
  tokens (matched whole, not special).

Unlike transformers, ``add_bos_token``/``add_eos_token`` and ``add_space_prefix`` follow the file
(llama.cpp's behaviour); a SentencePiece file without ``add_bos_token`` adds BOS, as llama.cpp
does.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from .tokenizer import Tokenizer, TokenizerConfigError

__all__ = ["GGUFTokenizerError", "tokenizer_from_gguf"]

_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4
_METASPACE = "\u2581"


class GGUFTokenizerError(TokenizerConfigError):
    """The file is not a readable GGUF, or describes a tokenizer we cannot build."""


_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# `tokenizer.ggml.pre` -> split regex (transformers' GGUF_PRE_TOKENIZER_SPLITS). Names not
# listed (gpt2, smollm, default, ...) keep ByteLevel's own GPT-2 regex.
PRE_TOKENIZER_SPLITS: dict[str, str] = {
    **dict.fromkeys(
        (
            "llama3",
            "llama-v3",
            "llama-bpe",
            "falcon3",
            "falcon-h1",
            "pixtral",
            "midm-2.0",
            "lfm2",
            "jina-v5-nano",
            "dbrx",
            "smaug-bpe",
        ),
        _LLAMA3_SPLIT,
    ),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
}


@functools.lru_cache(maxsize=1)
@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE vocabularies)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(printable, codes)}


def generate_merges(
    vocab: dict[str, int], vocab_scores: dict[str, float] | None = None
) -> list[tuple[str, str]]:
    """BPE merges implied by a vocabulary: every split of a token into two vocabulary tokens,
    best score first (transformers' ``tokenization_utils_base.generate_merges``)."""
    reverse = vocab_scores is not None
    scores: dict[str, Any] = dict(vocab_scores) if vocab_scores is not None else dict(vocab)
    merges: list[tuple[str, str, Any]] = []
    for merge, score in scores.items():
        local = []
        for index in range(1, len(merge)):
            left, right = merge[:index], merge[index:]
            if left in vocab and right in vocab:
                local.append((left, right, score))
        local.sort(key=lambda x: (vocab[x[0]], vocab[x[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=reverse)
    return [(m[0], m[1]) for m in merges]


def _file_merges(meta: dict[str, Any]) -> list[tuple[str, str]] | None:
    raw = meta.get("tokenizer.ggml.merges")
    if raw is None:
        return None
    merges = []
    for merge in raw:
        left, sep, right = str(merge).partition(" ")
        if sep:
            merges.append((left, right))
    return merges


# --------------------------------------------------------------------- builders


def _byte_level(meta: dict[str, Any], _arch: str) -> tokenizers.Tokenizer:
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab: dict[str, int] = {}
    for index, token in enumerate(meta["tokenizer.ggml.tokens"]):
        if not set(token) <= alphabet:
            # Not written in the byte alphabet: spell its UTF-8 bytes (as transformers does).
            token = "".join(spelling[b] for b in token.encode("utf-8"))
        vocab[token] = index
    merges = _file_merges(meta) or []
    tok = tokenizers.Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    split = PRE_TOKENIZER_SPLITS.get(str(meta.get("tokenizer.ggml.pre", "")))
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    return tok


def _unk_token(meta: dict[str, Any]) -> str | None:
    tokens = meta["tokenizer.ggml.tokens"]
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    if isinstance(unk_id, int) and 0 <= unk_id < len(tokens):
        return str(tokens[unk_id])
    return None


def _sentencepiece_bpe(
    tokens: Sequence[str], merges: list[tuple[str, str]], unk: str | None
) -> tokenizers.Tokenizer:
    vocab = {token: index for index, token in enumerate(tokens)}
    return tokenizers.Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            fuse_unk=True,
            byte_fallback=True,
            dropout=None,
            unk_token=unk if unk in vocab else None,
        )
    )


def _sentencepiece_merges(
    meta: dict[str, Any], tokens: Sequence[str], scores: dict[str, float] | None = None
) -> list[tuple[str, str]]:
    merges = _file_merges(meta)
    if merges is not None:
        return merges
    vocab = {token: index for index, token in enumerate(tokens)}
    if scores is None:
        raw_scores = meta.get("tokenizer.ggml.scores")
        if raw_scores is None:
            raise GGUFTokenizerError("SentencePiece vocabulary has neither merges nor scores")
        scores = {token: float(s) for token, s in zip(tokens, raw_scores)}
    return generate_merges(vocab, scores)


def _add_prefix_space(meta: dict[str, Any]) -> bool:
    value = meta.get("tokenizer.ggml.add_space_prefix")
    return True if value is None else bool(value)


def _llama_decoder(add_prefix_space: bool) -> decoders.Decoder:
    steps = [decoders.Replace(_METASPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix_space:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    return decoders.Sequence(steps)


def _sentencepiece(meta: dict[str, Any], _arch: str) -> tokenizers.Tokenizer:
    tokens = [str(t) for t in meta["tokenizer.ggml.tokens"]]
    tok = _sentencepiece_bpe(tokens, _sentencepiece_merges(meta, tokens), _unk_token(meta))
    prefix = _add_prefix_space(meta)
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=_METASPACE, prepend_scheme="first" if prefix else "never", split=False
    )
    tok.decoder = _llama_decoder(prefix)
    return tok


def _phi3(meta: dict[str, Any], arch: str) -> tokenizers.Tokenizer:
    """SentencePiece whose prefix space comes from a normalizer, not from Metaspace."""
    tok = _sentencepiece(meta, arch)
    tok.normalizer = normalizers.Sequence(
        [normalizers.Prepend(prepend=_METASPACE), normalizers.Replace(pattern=" ", content=_METASPACE)]
    )
    tok.pre_tokenizer = None
    tok.decoder = _llama_decoder(True)
    return tok


def _gemma_pipeline(tok: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
    tok.normalizer = normalizers.Replace(" ", _METASPACE)
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous")
    tok.decoder = decoders.Sequence(
        [decoders.Replace(_METASPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    return tok


def _gemma(meta: dict[str, Any], _arch: str) -> tokenizers.Tokenizer:
    """Gemma 1-3: multi-space tokens are stored as spaces (respell them as ▁), and merges are
    rebuilt in file order rather than by score."""
    tokens = [
        _METASPACE * len(t) if " " in t and not t.strip() else str(t)
        for t in meta["tokenizer.ggml.tokens"]
    ]
    positions = {token: float(-index) for index, token in enumerate(tokens)}
    merges = _sentencepiece_merges(meta, tokens, positions)
    return _gemma_pipeline(_sentencepiece_bpe(tokens, merges, _unk_token(meta)))


def _gemma4(meta: dict[str, Any], _arch: str) -> tokenizers.Tokenizer:
    tokens = [str(t) for t in meta["tokenizer.ggml.tokens"]]
    merges = _sentencepiece_merges(meta, tokens)
    return _gemma_pipeline(_sentencepiece_bpe(tokens, merges, _unk_token(meta)))


_SENTENCEPIECE_BY_ARCH: dict[str, Callable[[dict[str, Any], str], tokenizers.Tokenizer]] = {
    "gemma": _gemma,
    "gemma2": _gemma,
    "gemma3": _gemma,
    "phi3": _phi3,
}
_BY_MODEL: dict[str, Callable[[dict[str, Any], str], tokenizers.Tokenizer]] = {
    "gpt2": _byte_level,
    "llama": _sentencepiece,
    "gemma4": _gemma4,
}


def _add_file_tokens(tok: tokenizers.Tokenizer, meta: dict[str, Any], byte_level: bool) -> None:
    """CONTROL tokens as special added tokens, USER_DEFINED ones as plain added tokens."""
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or ()
    alphabet = set(bytes_to_unicode().values()) if byte_level else None
    control = [
        AddedToken(token, normalized=False, special=True)
        for token, kind in zip(tokens, types)
        # In a byte-level vocabulary every real token is in the byte alphabet; a CONTROL token
        # outside it is a llama.cpp mislabel, and adding it would grow the vocabulary.
        if kind == _TOKEN_TYPE_CONTROL and (alphabet is None or set(token) <= alphabet)
    ]
    if control:
        tok.add_special_tokens(control)
    vocab = tok.get_vocab(with_added_tokens=True)
    user = [
        AddedToken(token, normalized=False, special=False)
        for token, kind in zip(tokens, types)
        if kind == _TOKEN_TYPE_USER_DEFINED and token in vocab
    ]
    if user:
        tok.add_tokens(user)


# --------------------------------------------------------------------- reading


_KEYS = (
    "general.architecture",
    "tokenizer.ggml.model",
    "tokenizer.ggml.pre",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.scores",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.unknown_token_id",
    "tokenizer.ggml.padding_token_id",
    "tokenizer.ggml.add_bos_token",
    "tokenizer.ggml.add_eos_token",
    "tokenizer.ggml.add_space_prefix",
    "tokenizer.chat_template",
)


def _read_metadata(path: Path, reader: Any | None) -> dict[str, Any]:
    if reader is None:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such GGUF file")
        try:
            import gguf

            reader = gguf.GGUFReader(path)
        except Exception as exc:  # gguf raises ValueError, IndexError, struct errors, ...
            raise GGUFTokenizerError(
                f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc})"
            ) from exc
    meta: dict[str, Any] = {}
    try:
        for key in _KEYS:
            field = reader.fields.get(key)
            if field is not None:
                meta[key] = field.contents()
        named = [k for k in reader.fields if k.startswith("tokenizer.chat_template.")]
        for key in named:
            meta[key] = reader.fields[key].contents()
    except Exception as exc:
        raise GGUFTokenizerError(
            f"{path}: unreadable tokenizer metadata ({type(exc).__name__}: {exc})"
        ) from exc
    return meta


def _special(meta: dict[str, Any], key: str) -> str | None:
    tokens = meta["tokenizer.ggml.tokens"]
    token_id = meta.get(f"tokenizer.ggml.{key}")
    if isinstance(token_id, int) and 0 <= token_id < len(tokens):
        return str(tokens[token_id])
    return None


def tokenizer_from_gguf(path: str | Path, *, reader: Any | None = None) -> Tokenizer:
    """Build the tokenizer a GGUF file describes (see the module docstring).

    `reader` may be an already-open ``gguf.GGUFReader`` for `path` (opening one costs about 2 s
    on a 100 MB file, so a loader that has one should pass it). Raises FileNotFoundError for a
    missing file and GGUFTokenizerError (a ValueError) naming the file for a truncated or
    non-GGUF file, missing tokenizer metadata or an unsupported tokenizer model.
    """
    path = Path(path)
    meta = _read_metadata(path, reader)
    model = meta.get("tokenizer.ggml.model")
    if model is None or "tokenizer.ggml.tokens" not in meta:
        raise GGUFTokenizerError(f"{path}: GGUF file has no tokenizer metadata (tokenizer.ggml.*)")
    model = str(model)
    arch = str(meta.get("general.architecture", ""))
    if model == "llama" and arch in _SENTENCEPIECE_BY_ARCH:
        builder = _SENTENCEPIECE_BY_ARCH[arch]
    elif model in _BY_MODEL:
        builder = _BY_MODEL[model]
    else:
        raise GGUFTokenizerError(
            f"{path}: unsupported GGUF tokenizer model {model!r} "
            f"(supported: {', '.join(sorted(_BY_MODEL))})"
        )
    try:
        tok = builder(meta, arch)
        _add_file_tokens(tok, meta, byte_level=model == "gpt2")
    except GGUFTokenizerError as exc:
        raise GGUFTokenizerError(f"{path}: {exc}") from exc
    except Exception as exc:
        raise GGUFTokenizerError(
            f"{path}: cannot build the {model!r} tokenizer ({type(exc).__name__}: {exc})"
        ) from exc

    bos, eos = _special(meta, "bos_token_id"), _special(meta, "eos_token_id")
    pad, unk = _special(meta, "padding_token_id"), _special(meta, "unknown_token_id")
    # Special tokens the file names are matched whole even when their type is not CONTROL
    # (transformers adds them as special tokens too); they already have ids, so none grow.
    named = [t for t in (bos, eos, pad, unk) if t is not None and tok.token_to_id(t) is not None]
    if named:
        tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in named])

    add_bos = meta.get("tokenizer.ggml.add_bos_token")
    if add_bos is None:
        add_bos = model == "llama"  # llama.cpp adds BOS to SentencePiece vocabularies by default
    named_templates = {
        key.removeprefix("tokenizer.chat_template."): str(value)
        for key, value in meta.items()
        if key.startswith("tokenizer.chat_template.")
    }
    template = meta.get("tokenizer.chat_template")
    return Tokenizer(
        tok,
        bos_token=bos,
        eos_token=eos,
        add_bos_token=bool(add_bos),
        add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        chat_template=None if template is None else str(template),
        pad_token=pad,
        extra_special_tokens={"unk_token": unk} if unk is not None else None,
        named_chat_templates=named_templates,
    )
