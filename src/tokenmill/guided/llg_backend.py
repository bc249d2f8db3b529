"""llguidance behind the `GrammarBackend` seam.

Why llguidance (shared/notes/ecosystem.md §1): no dependencies, ~1 ms compiles, the widest
JSON Schema coverage, honest errors for bad regexes or schemas, and `LLMatcher.rollback`.

Costs are bounded three ways: a size cap on the grammar text, llguidance's fuel limits (the
compile and per-mask budgets, `GrammarLimits`), and two bounded LRU caches keyed by a content
hash, one of check results (API side) and one of compiled matchers (engine side), so a client
resending one costly schema pays its compile once and many distinct schemas evict each other.

JSON output is compact by default (``whitespace_flexible: false``: ``{"a":1,"b":[2]}``); a
schema may override the compile options through llguidance's ``x-guidance`` key.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import llguidance as llg

from tokenmill.guided.backend import (
    GrammarBackend,
    GrammarError,
    GrammarLimits,
    GrammarMatcher,
    LRUCache,
    spec_key,
)
from tokenmill.protocol import GrammarSpec

if TYPE_CHECKING:
    import torch

    from tokenmill.tokenizer import Tokenizer

__all__ = ["LLGuidanceBackend", "LLGuidanceMatcher", "to_llguidance"]

logger = logging.getLogger("tokenmill.guided")

_JSON_DEFAULTS: Any = {"whitespace_flexible": False}
_ANY_OBJECT = '{"type":"object"}'
_SLOW_COMPILE_S = 0.05  # compiles slower than this are logged
_MAX_MESSAGE = 2000  # characters of a compiler message kept (cached and sent back)

#: () -> (the model's tokenizer, its EOS token ids)
TokenizerLoader = Callable[[], "tuple[Tokenizer, list[int]]"]


def to_llguidance(spec: GrammarSpec) -> str:
    """The llguidance grammar (its JSON envelope) of a spec. Raises GrammarError for a JSON
    Schema that is not JSON; everything else is checked by compiling."""
    if spec.kind == "regex":
        return llg.LLMatcher.grammar_from_regex(spec.value)
    if spec.kind == "lark":
        return llg.LLMatcher.grammar_from_lark(spec.value)
    if spec.kind == "json_object":
        return llg.LLMatcher.grammar_from_json_schema(_ANY_OBJECT, defaults=_JSON_DEFAULTS)
    if spec.kind != "json":
        raise GrammarError(f"unknown grammar type {spec.kind!r}")
    try:
        schema = json.loads(spec.value)
    except (ValueError, RecursionError) as e:
        raise GrammarError(f"the JSON Schema is not valid JSON: {e}") from None
    if not isinstance(schema, (dict, bool)):
        raise GrammarError("the JSON Schema must be an object or a boolean")
    if schema is False:
        raise GrammarError("the JSON Schema `false` allows no value")
    try:
        # `true` is `{}` (any value): llguidance applies its options to object schemas only.
        return llg.LLMatcher.grammar_from_json_schema(spec.value if schema is not True else "{}",
                                                      defaults=_JSON_DEFAULTS)
    except ValueError as e:
        raise GrammarError(str(e)) from None


class LLGuidanceMatcher(GrammarMatcher):
    __slots__ = ("m",)

    def __init__(self, m: llg.LLMatcher) -> None:
        self.m = m

    def consume(self, token_id: int) -> bool:
        return bool(self.m.consume_token(token_id))

    def replay(self, token_ids: Sequence[int]) -> bool:
        return bool(self.m.consume_tokens(list(token_ids))) if token_ids else not self.m.is_error()

    def rollback(self, num_tokens: int) -> bool:
        return bool(self.m.rollback(num_tokens))

    @property
    def is_stopped(self) -> bool:
        return bool(self.m.is_stopped())

    @property
    def error(self) -> str:
        return str(self.m.get_error())


class LLGuidanceBackend(GrammarBackend):
    """``tokenizer_loader`` is called once, on the first ``matcher`` call (so a server that never
    sees a constrained request never builds the grammar tokenizer). ``vocab_size`` is the
    model's logit width; the masks cover at least that many tokens."""

    name = "llguidance"

    def __init__(self, tokenizer_loader: TokenizerLoader | None = None, vocab_size: int = 0,
                 limits: GrammarLimits | None = None, num_threads: int | None = None) -> None:
        super().__init__(limits)
        self._loader = tokenizer_loader
        self._vocab_size = vocab_size
        self._num_threads = num_threads
        lim = self.limits
        self.parser_limits = llg.LLParserLimits(
            max_items_in_row=lim.max_items_in_row, initial_lexer_fuel=lim.initial_lexer_fuel,
            step_lexer_fuel=lim.step_lexer_fuel, step_max_items=lim.step_max_items,
            max_lexer_states=lim.max_lexer_states, max_grammar_size=lim.max_grammar_size,
            verbose_errors=False)  # errors must not echo parser state or the grammar back
        self._checked: LRUCache[bytes, str] = LRUCache(8 * lim.cache_entries)
        self._compiled: LRUCache[bytes, llg.LLMatcher] = LRUCache(lim.cache_entries)
        self._tokenizer: llg.LLTokenizer | None = None
        self._executor: llg.LLExecutor | None = None
        self._lock = threading.Lock()  # the lazy tokenizer build

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: list[int],
                       **kwargs: Any) -> LLGuidanceBackend:
        return cls(lambda: (tokenizer, list(eos_token_ids)), vocab_size, **kwargs)

    # ---- API side --------------------------------------------------------------------------
    def check(self, spec: GrammarSpec) -> None:
        self.check_size(spec)
        key = spec_key(spec)
        err = self._checked.get(key)
        if err is None:
            t0 = time.perf_counter()
            try:
                is_err, msgs = llg.LLMatcher.validate_grammar_with_warnings(
                    to_llguidance(spec), limits=self.parser_limits)
                err = msgs[0][:_MAX_MESSAGE] if is_err and msgs else ""
            except GrammarError as e:
                err = str(e)[:_MAX_MESSAGE]
            except (ValueError, TypeError) as e:  # e.g. a lone surrogate the compiler refuses
                err = f"the grammar cannot be compiled: {e}"[:_MAX_MESSAGE]
            self._log_slow("checked", spec, time.perf_counter() - t0)
            self._checked.put(key, err)
        if err:
            raise GrammarError(err)

    # ---- engine side -----------------------------------------------------------------------
    @property
    def tokenizer(self) -> llg.LLTokenizer:
        with self._lock:
            if self._tokenizer is None:
                if self._loader is None:
                    raise RuntimeError("this grammar backend has no tokenizer")
                t0 = time.perf_counter()
                tok, eos = self._loader()
                # The model's logit width, or more if the tokenizer has ids past lm_head.
                n_vocab = max(self._vocab_size, tok.vocab_size)
                self._tokenizer = llg.LLTokenizer(tok.backend.to_str(), n_vocab=n_vocab,
                                                  eos_token=eos or None)
                logger.info("grammar tokenizer built in %.2fs (%d tokens, EOS %s)",
                            time.perf_counter() - t0, n_vocab, eos)
            return self._tokenizer

    @property
    def bitmask_words(self) -> int:
        return (self.tokenizer.vocab_size + 31) // 32

    def matcher(self, spec: GrammarSpec) -> LLGuidanceMatcher:
        tok = self.tokenizer
        key = spec_key(spec)
        proto = self._compiled.get(key)
        if proto is None:
            t0 = time.perf_counter()
            try:
                proto = llg.LLMatcher(tok, to_llguidance(spec), log_level=0,
                                      limits=self.parser_limits)
                err = proto.get_error() if proto.is_error() else ""
            except (ValueError, TypeError) as e:  # GrammarError included; check() refuses these
                # Not a grammar: a matcher in its error state, whose mask allows only EOS.
                proto = llg.LLMatcher(tok, "{}", log_level=0)
                err = str(e)
            self._log_slow("compiled", spec, time.perf_counter() - t0)
            if err:
                logger.warning("a %s grammar failed to compile in the engine: %s", spec.kind,
                               err[:_MAX_MESSAGE])
            self._compiled.put(key, proto)
        # The cached matcher stays at the start state; each request advances its own copy.
        return LLGuidanceMatcher(proto.deep_copy())

    def fill_bitmask(self, matchers: Sequence[GrammarMatcher], bitmask: torch.Tensor) -> None:
        if self._executor is None:
            self._executor = llg.LLExecutor(self._num_threads)
        words = self.bitmask_words
        if (str(bitmask.dtype) != "torch.int32" or bitmask.dim() != 2 or bitmask.shape[1] != words
                or bitmask.shape[0] < len(matchers) or not bitmask.is_contiguous()
                or bitmask.device.type != "cpu"):
            raise ValueError(f"bitmask must be a contiguous CPU int32 [>= {len(matchers)}, "
                             f"{words}] tensor")
        pairs = [(m.m, i) for i, m in enumerate(matchers) if isinstance(m, LLGuidanceMatcher)]
        if len(pairs) != len(matchers):
            raise TypeError("fill_bitmask takes this backend's matchers only")
        self._executor.unsafe_compute_mask_ptr(pairs, bitmask.data_ptr(), words * 4,
                                               bitmask.shape[0])

    def _log_slow(self, what: str, spec: GrammarSpec, dt: float) -> None:
        if dt > _SLOW_COMPILE_S:
            logger.info("a %s grammar of %d characters %s in %.0f ms", spec.kind,
                        len(spec.value), what, dt * 1e3)


_default: LLGuidanceBackend | None = None


def default_backend() -> LLGuidanceBackend:
    """A process-wide tokenizer-free backend for ``check`` (its cache is shared by all callers)."""
    global _default
    if _default is None:
        _default = LLGuidanceBackend()
    return _default
