"""The tokenizer the server uses: a `tokenizers.Tokenizer` plus the model's special tokens,
BOS/EOS policy and chat template. No transformers at runtime."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers

from .chat_template import (
    DEFAULT_MAX_OUTPUT_CHARS,
    DEFAULT_RENDER_TIMEOUT_S,
    ChatTemplateError,
    render_chat_template,
)

__all__ = ["Tokenizer", "TokenizerConfigError", "tokenizer_from_folder"]

_METASPACE = "\u2581"


class TokenizerConfigError(ValueError):
    """A tokenizer file exists but cannot be used (bad JSON, bad GGUF, unsupported model)."""


class Tokenizer:
    """Text <-> token ids for one model, plus its chat template.

    Special-token policy of :meth:`encode`: special-token text in the input (for example
    ``"<|im_end|>"``) is parsed as that special token, as transformers does by default
    (``split_special_tokens=False``). Callers that put untrusted user text into a prompt and
    must not let it forge control tokens should escape or reject such text before encoding.

    BOS/EOS: with ``add_special_tokens=True``, BOS is prepended only if the model says so
    (``add_bos_token``) and EOS appended only if ``add_eos_token``. With
    ``keep_post_processor=True`` (used for `tokenizer.json` files whose own post-processor adds
    the special tokens, like Llama 3 and SmolLM2 upstream), that post-processor runs instead, as
    in transformers, and the two flags only report what it does. Nothing is ever added twice by
    us, but like transformers we do not remove a BOS that the text itself already starts with:
    encode rendered chat prompts, which usually contain their own BOS, with
    ``add_special_tokens=False``.

    The wrapped `tokenizers.Tokenizer` is used as given (padding and truncation are the
    caller's business; `tokenizer_from_folder` switches both off).
    """

    def __init__(
        self,
        tok: tokenizers.Tokenizer,
        *,
        bos_token: str | None,
        eos_token: str | None,
        add_bos_token: bool,
        add_eos_token: bool = False,
        chat_template: str | None,
        pad_token: str | None = None,
        extra_special_tokens: dict[str, str] | None = None,
        named_chat_templates: Mapping[str, str] | None = None,
        keep_post_processor: bool = False,
    ) -> None:
        self._tok = tok
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.pad_token = pad_token
        self.chat_template = chat_template
        self.named_chat_templates: dict[str, str] = dict(named_chat_templates or {})
        self.extra_special_tokens: dict[str, str] = dict(extra_special_tokens or {})
        self.bos_token_id = self._lookup(bos_token)
        self.eos_token_id = self._lookup(eos_token)
        self.pad_token_id = self._lookup(pad_token)
        self._keep_post_processor = keep_post_processor
        # Like transformers: a flag naming a token the vocabulary lacks is dropped.
        self.add_bos_token = bool(add_bos_token) and self.bos_token_id is not None
        self.add_eos_token = bool(add_eos_token) and self.eos_token_id is not None
        # Render limits for apply_chat_template (see chat_template.py).
        self.chat_template_timeout_s: float | None = DEFAULT_RENDER_TIMEOUT_S
        self.chat_template_max_output_chars = DEFAULT_MAX_OUTPUT_CHARS

        added = tok.get_added_tokens_decoder()
        self._added_ids = frozenset(added)
        # Exactly the ids `tokenizers` drops on decode(skip_special_tokens=True).
        self.skipped_special_ids: frozenset[int] = frozenset(
            i for i, t in added.items() if t.special
        )
        named = {self.bos_token_id, self.eos_token_id, self.pad_token_id}
        named.update(self._lookup(t) for t in self.extra_special_tokens.values())
        self.all_special_ids: frozenset[int] = frozenset(
            self.skipped_special_ids | {i for i in named if i is not None}
        )

    @classmethod
    def from_folder(cls, path: str | Path) -> Tokenizer:
        """Same as :func:`tokenizer_from_folder`."""
        return tokenizer_from_folder(path)

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        """Same as :func:`tokenmill.tokenizer.gguf_tokenizer.tokenizer_from_gguf`."""
        from .gguf_tokenizer import tokenizer_from_gguf

        return tokenizer_from_gguf(path)

    # ----------------------------------------------------------------- basics

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped `tokenizers.Tokenizer`."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """`bos_token`, `eos_token`, `pad_token` and the extra special tokens, as the chat
        template sees them (None ones left out)."""
        tokens = {"bos_token": self.bos_token, "eos_token": self.eos_token}
        tokens["pad_token"] = self.pad_token
        tokens.update(self.extra_special_tokens)
        return {k: v for k, v in tokens.items() if v is not None}

    def _lookup(self, token: str | None) -> int | None:
        if token is None:
            return None
        i = self._tok.token_to_id(token)
        return None if i is None else int(i)

    def token_to_id(self, token: str) -> int | None:
        """The id of a raw vocabulary entry (for example ``"Ġthe"`` or ``"<|im_end|>"``)."""
        return self._lookup(token)

    # ----------------------------------------------------------------- encode / decode

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids for `text`.

        Special-token text inside `text` (``"<|im_start|>"``, ``"<|endoftext|>"``, ...) is
        parsed as the special token, like transformers' default. With `add_special_tokens`,
        BOS/EOS are added according to the model's flags (see the class docstring).
        """
        if self._keep_post_processor:
            return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)
        ids = list(self._tok.encode(text, add_special_tokens=False).ids)
        if add_special_tokens:
            if self.add_bos_token and self.bos_token_id is not None:
                ids.insert(0, self.bos_token_id)
            if self.add_eos_token and self.eos_token_id is not None:
                ids.append(self.eos_token_id)
        return ids

    def encode_batch(
        self, texts: Sequence[str], add_special_tokens: bool = True
    ) -> list[list[int]]:
        """`encode` for many texts (tokenized in parallel by `tokenizers`)."""
        if self._keep_post_processor:
            encodings = self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)
            return [list(e.ids) for e in encodings]
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        out = []
        for e in encodings:
            ids = list(e.ids)
            if add_special_tokens:
                if self.add_bos_token and self.bos_token_id is not None:
                    ids.insert(0, self.bos_token_id)
                if self.add_eos_token and self.eos_token_id is not None:
                    ids.append(self.eos_token_id)
            out.append(ids)
        return out

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text for `ids`; invalid UTF-8 is replaced with U+FFFD. `skip_special_tokens` drops
        the added tokens marked special (`skipped_special_ids`)."""
        return str(self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def id_to_token(self, token_id: int) -> str:
        """Display text of one token, for logprobs: ``" Paris"`` rather than ``"ĠParis"`` or
        ``"▁Paris"``; a token holding part of a UTF-8 character shows U+FFFD; an added token
        shows its content. Unknown ids give ``""``."""
        raw = self._tok.id_to_token(token_id)
        if raw is None:
            return ""
        if token_id in self._added_ids:
            return str(raw)
        text = str(self._tok.decode([token_id], skip_special_tokens=False))
        if raw.startswith(_METASPACE) and not text.startswith(" "):
            # SentencePiece decoders strip the space at the start of the text.
            text = " " + text
        return text

    def raw_token(self, token_id: int) -> str | None:
        """The vocabulary entry itself (``"ĠParis"``), or None for an unknown id."""
        raw = self._tok.id_to_token(token_id)
        return None if raw is None else str(raw)

    # ----------------------------------------------------------------- chat

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        documents: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """The prompt text for `messages`, rendered like transformers'
        ``apply_chat_template(..., tokenize=False)``. Raises ChatTemplateError (a ValueError)
        when there is no template or the template fails; see `render_chat_template`."""
        template = self.chat_template
        if tools and "tool_use" in self.named_chat_templates:
            template = self.named_chat_templates["tool_use"]
        if template is None:
            raise ChatTemplateError(
                "this model has no chat template; send a plain prompt or configure a template"
            )
        return render_chat_template(
            template,
            messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            documents=documents,
            special_tokens=self.special_tokens_map,
            timeout_s=self.chat_template_timeout_s,
            max_output_chars=self.chat_template_max_output_chars,
            **kwargs,
        )

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, "
            f"eos={self.eos_token!r}, add_bos_token={self.add_bos_token})"
        )


# --------------------------------------------------------------------- Hugging Face folder


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerConfigError(f"{path}: cannot read JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise TokenizerConfigError(f"{path}: expected a JSON object")
    return data


def _token_content(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _chat_templates(value: Any) -> tuple[str | None, dict[str, str]]:
    """`chat_template` from tokenizer_config.json: a string, or a list of {name, template}."""
    if isinstance(value, str):
        return value, {}
    if isinstance(value, list):
        named = {
            str(t["name"]): str(t["template"])
            for t in value
            if isinstance(t, dict) and "name" in t and "template" in t
        }
        return named.get("default"), named
    return None, {}


def tokenizer_from_folder(path: str | Path) -> Tokenizer:
    """Load a Hugging Face tokenizer folder: `tokenizer.json` (required),
    `tokenizer_config.json` and `special_tokens_map.json` (optional), `chat_template.jinja`
    (optional; wins over the config's `chat_template`).

    BOS/EOS follow transformers 5.x: when tokenizer.json has a post-processor (for example
    Llama 3's TemplateProcessing adding `<|begin_of_text|>`), it alone decides what
    ``encode(add_special_tokens=True)`` adds -- transformers 5 ignores the config's
    `add_bos_token`/`add_eos_token` whenever tokenizer.json exists. When tokenizer.json has no
    post-processor, we follow the config's flags (transformers 4.x behaviour; 5.x would add
    nothing).
    """
    folder = Path(path)
    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise FileNotFoundError(
            f"{tokenizer_file}: no such file (a Hugging Face tokenizer folder needs tokenizer.json)"
        )
    try:
        tok = tokenizers.Tokenizer.from_file(str(tokenizer_file))
    except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
        raise TokenizerConfigError(f"{tokenizer_file}: cannot load: {exc}") from exc
    tok.no_truncation()
    tok.no_padding()

    config_file = folder / "tokenizer_config.json"
    config = _read_json(config_file) if config_file.is_file() else {}
    special_map_file = folder / "special_tokens_map.json"
    special_map = _read_json(special_map_file) if special_map_file.is_file() else {}

    def special(name: str) -> str | None:
        value = _token_content(config.get(name))
        return value if value is not None else _token_content(special_map.get(name))

    chat_template, named = _chat_templates(config.get("chat_template"))
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        chat_template = jinja_file.read_text(encoding="utf-8")

    bos, eos, pad = special("bos_token"), special("eos_token"), special("pad_token")
    extra = {}
    for name in ("unk_token", "sep_token", "cls_token", "mask_token"):
        value = special(name)
        if value is not None:
            extra[name] = value

    if tok.post_processor is None:
        add_bos = bool(config.get("add_bos_token", False))
        add_eos = bool(config.get("add_eos_token", False))
        keep = False
    else:
        probe = list(tok.encode("", add_special_tokens=True).ids)
        bos_id = tok.token_to_id(bos) if bos is not None else None
        eos_id = tok.token_to_id(eos) if eos is not None else None
        add_bos = bool(probe) and bos_id is not None and probe[0] == bos_id
        add_eos = bool(probe) and eos_id is not None and probe[-1] == eos_id
        keep = True
    return Tokenizer(
        tok,
        bos_token=bos,
        eos_token=eos,
        add_bos_token=add_bos,
        add_eos_token=add_eos,
        chat_template=chat_template,
        pad_token=pad,
        extra_special_tokens=extra,
        named_chat_templates=named,
        keep_post_processor=keep,
    )
