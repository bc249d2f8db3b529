"""The grammar-engine seam: what the runner needs from a constrained-decoding library.

A backend compiles a `GrammarSpec` into per-request matchers and fills next-token bitmasks
for a batch of them; llguidance is the one implementation (`llg_backend.py`), and another
engine (xgrammar, outlines-core) would plug in here without touching the runner.

Bitmask layout (llguidance's, also xgrammar's): one int32 row of ``ceil(n_vocab / 32)`` words
per request; bit ``j`` of word ``i`` set means token ``32 * i + j`` is allowed.

No torch here: the API process uses `check` only.
"""

from __future__ import annotations

import abc
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

from tokenmill.protocol import GrammarSpec

if TYPE_CHECKING:
    import torch

__all__ = [
    "GrammarBackend",
    "GrammarError",
    "GrammarLimits",
    "GrammarMatcher",
    "LRUCache",
    "spec_key",
]


class GrammarError(ValueError):
    """A grammar that cannot be compiled (the message is the compiler's) or is over a cap."""


@dataclass(frozen=True, slots=True)
class GrammarLimits:
    """Caps that keep request-time grammars from exhausting CPU or memory.

    The compile and per-step costs are bounded by llguidance's fuel limits (its documented
    speeds: lexer fuel ~14k/ms per step, Earley items ~20k/ms); there is no wall clock in the
    compiler, so fuel is the time budget. ``max_lexer_states`` bounds a matcher's memory
    (1-2 kB per state); llguidance's own default is 250,000.
    """

    max_grammar_bytes: int = 64 * 1024  # schema / regex / Lark text, UTF-8
    max_items_in_row: int = 2_000  # branching of one grammar rule
    initial_lexer_fuel: int = 1_000_000  # building the lexer: ~20 ms at most
    step_lexer_fuel: int = 200_000  # one mask: ~14 ms at most
    step_max_items: int = 50_000  # Earley items per mask: ~2.5 ms at most
    max_lexer_states: int = 50_000  # ~100 MB at most per matcher
    max_grammar_size: int = 500_000  # symbols in the compiled grammar
    cache_entries: int = 128  # compiled grammars kept, least recently used evicted

    def __post_init__(self) -> None:
        if min(self.max_grammar_bytes, self.cache_entries, self.max_lexer_states) < 1:
            raise ValueError("grammar limits must be positive")


def spec_key(spec: GrammarSpec) -> bytes:
    """A content hash: the cache key of a grammar (never the text, which may be 64 KiB)."""
    h = hashlib.blake2b(spec.kind.encode(), digest_size=16)
    h.update(b"\0")
    h.update(spec.value.encode("utf-8", "surrogatepass"))
    return h.digest()


K = TypeVar("K")
V = TypeVar("V")


class LRUCache(Generic[K, V]):
    """A small bounded mapping; the least recently used entry goes first. Thread-safe (the
    API's event loop and, in thread mode, the engine thread share the check cache)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._d: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: K) -> V | None:
        with self._lock:
            v = self._d.get(key)
            if v is None:
                self.misses += 1
                return None
            self.hits += 1
            self._d.move_to_end(key)
            return v

    def put(self, key: K, value: V) -> None:
        with self._lock:
            self._d[key] = value
            self._d.move_to_end(key)
            while len(self._d) > self.capacity:
                self._d.popitem(last=False)

    def __len__(self) -> int:
        return len(self._d)


class GrammarMatcher(abc.ABC):
    """One request's position in its grammar. Consuming a token the grammar forbids (or
    hitting a limit) puts it in an error state for good; its mask then allows only EOS."""

    @abc.abstractmethod
    def consume(self, token_id: int) -> bool:
        """Advance by one sampled token; False if it was not allowed (error state)."""

    @abc.abstractmethod
    def replay(self, token_ids: Sequence[int]) -> bool:
        """Consume tokens already generated (a request resumed after preemption)."""

    @abc.abstractmethod
    def rollback(self, num_tokens: int) -> bool:
        """Undo the last ``num_tokens`` (speculative decoding's rejected drafts)."""

    @property
    @abc.abstractmethod
    def is_stopped(self) -> bool:
        """Nothing but EOS can follow (the grammar is complete, or in error)."""

    @property
    @abc.abstractmethod
    def error(self) -> str:
        """The error message, or "" while the matcher is healthy."""


class GrammarBackend(abc.ABC):
    """Compiles grammars and computes masks. ``check`` needs no tokenizer (the API process
    uses it); ``matcher`` and ``fill_bitmask`` are the engine's."""

    name: str = ""

    def __init__(self, limits: GrammarLimits | None = None) -> None:
        self.limits = limits or GrammarLimits()

    def check_size(self, spec: GrammarSpec) -> None:
        cap = self.limits.max_grammar_bytes
        # Every character is at least one byte: only short enough texts need encoding.
        if len(spec.value) > cap or len(spec.value.encode("utf-8", "surrogatepass")) > cap:
            raise GrammarError(f"the grammar is too large (over {self.limits.max_grammar_bytes} "
                               "bytes)")

    @abc.abstractmethod
    def check(self, spec: GrammarSpec) -> None:
        """Raise GrammarError (the compiler's message) if ``spec`` does not compile."""

    @abc.abstractmethod
    def matcher(self, spec: GrammarSpec) -> GrammarMatcher:
        """A fresh matcher at the start of the grammar. Never raises for a bad grammar: the
        matcher is then in its error state (see ``GrammarMatcher.error``)."""

    @property
    @abc.abstractmethod
    def bitmask_words(self) -> int:
        """int32 words per bitmask row."""

    @abc.abstractmethod
    def fill_bitmask(self, matchers: Sequence[GrammarMatcher], bitmask: torch.Tensor) -> None:
        """Row ``i`` of ``bitmask`` (CPU, int32, contiguous) ← the mask of ``matchers[i]``,
        computed for all of them together. Safe to call off the main thread."""
