"""Tokenizers (Hugging Face folders and GGUF files), chat templates, streaming detokenization."""

from __future__ import annotations

from .chat_template import ChatTemplateError, compile_chat_template, render_chat_template
from .detokenizer import IncrementalDetokenizer
from .gguf_tokenizer import GGUFTokenizerError, tokenizer_from_gguf
from .tokenizer import Tokenizer, TokenizerConfigError, tokenizer_from_folder

__all__ = [
    "ChatTemplateError",
    "GGUFTokenizerError",
    "IncrementalDetokenizer",
    "Tokenizer",
    "TokenizerConfigError",
    "compile_chat_template",
    "render_chat_template",
    "tokenizer_from_folder",
    "tokenizer_from_gguf",
]
