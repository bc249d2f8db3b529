"""Constrained decoding: JSON Schema, regex and Lark grammars (llguidance).

* `backend.py`: the `GrammarBackend` / `GrammarMatcher` seam, limits, caches.
* `llg_backend.py`: the llguidance implementation.
* `bitmask.py` (imports torch; the runner's): masks filled on a worker thread during the
  forward pass, applied to the logits as a 0 / -inf bias.

`check_grammar` is what request validation calls (``SamplingParams.validate``): it needs no
tokenizer and keeps a bounded cache of results, so the API process can refuse a bad grammar
with the compiler's message before the request is queued.
"""

from __future__ import annotations

from tokenmill.guided.backend import (
    GrammarBackend,
    GrammarError,
    GrammarLimits,
    GrammarMatcher,
    spec_key,
)
from tokenmill.protocol import GrammarSpec

__all__ = [
    "GrammarBackend",
    "GrammarError",
    "GrammarLimits",
    "GrammarMatcher",
    "GrammarSpec",
    "check_grammar",
    "spec_key",
]


def check_grammar(spec: GrammarSpec) -> None:
    """Raise GrammarError (a ValueError) with the compiler's message if ``spec`` is refused."""
    from tokenmill.guided.llg_backend import default_backend

    default_backend().check(spec)
