"""Types that cross module (and later process) boundaries: plain msgspec structs, no tensors.

msgspec structs encode to msgpack without pickle, so the same types can travel over ZMQ
between the API process and the engine process.
"""

from __future__ import annotations

import enum
from typing import Literal

import msgspec


class FinishReason(str, enum.Enum):
    """Why a sequence stopped. Values are TGI's `finish_reason` strings."""

    LENGTH = "length"  # max_new_tokens or the model's context reached
    EOS = "eos_token"  # an EOS / stop token id was generated
    STOP = "stop_sequence"  # a stop string matched
    ABORT = "abort"  # cancelled by the client or the server

    @property
    def openai(self) -> str:
        return "length" if self is FinishReason.LENGTH else "stop"


GrammarKind = Literal["json", "regex", "lark", "json_object"]


class GrammarSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A constrained-decoding grammar (compiled by `tokenmill.guided`). ``value`` is text: a JSON
    Schema serialized as JSON (``json``), a regex (``regex``, the whole output must match), a
    Lark grammar (``lark``), or empty (``json_object``: any JSON object)."""

    kind: GrammarKind
    value: str = ""


class SamplingParams(msgspec.Struct, omit_defaults=True, kw_only=True):
    """Per-request generation settings.

    Semantics follow TGI where TGI has the parameter (repetition_penalty, typical_p,
    top_n_tokens) and OpenAI / vLLM otherwise (frequency/presence penalty, min_p).
    ``temperature == 0`` (or below 1e-5) means greedy. Filters are disabled at their neutral values:
    top_k <= 0, top_p >= 1, typical_p >= 1, min_p <= 0, penalties at 1.0 / 0.0.
    """

    max_new_tokens: int = 16
    min_new_tokens: int = 0  # stop tokens are masked until this many tokens exist
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    typical_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF/TGI: over prompt and output tokens
    frequency_penalty: float = 0.0  # OpenAI: over output tokens, times the count
    presence_penalty: float = 0.0  # OpenAI: over output tokens, once
    seed: int | None = None  # None: the engine draws one (reported back, as TGI does)
    stop: list[str] = msgspec.field(default_factory=list)
    stop_token_ids: list[int] = msgspec.field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # None: none; 0: chosen token only; n: also top-n alternatives
    prompt_logprobs: int | None = None  # same meaning, for every prompt token after the first
    skip_special_tokens: bool = True
    watermark: bool = False  # Kirchenbauer green-list bias (the server's gamma and delta)
    grammar: GrammarSpec | None = None  # constrained decoding (JSON Schema, regex, Lark)

    def validate(self) -> None:
        """Raise ValueError with a user-facing message when a value is out of range."""
        import math

        def finite(name: str, v: float) -> None:
            if not math.isfinite(v):
                raise ValueError(f"`{name}` must be a finite number")

        for name in ("temperature", "top_p", "typical_p", "min_p", "repetition_penalty",
                     "frequency_penalty", "presence_penalty"):
            finite(name, getattr(self, name))
        if self.max_new_tokens < 1:
            raise ValueError("`max_new_tokens` must be strictly positive")
        if self.min_new_tokens < 0:
            raise ValueError("`min_new_tokens` must be >= 0")
        if self.temperature < 0:
            raise ValueError("`temperature` must be >= 0")
        if self.top_k < 0:
            raise ValueError("`top_k` must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("`top_p` must be > 0.0 and <= 1.0")
        if not 0 < self.typical_p <= 1:
            raise ValueError("`typical_p` must be > 0.0 and <= 1.0")
        if not 0 <= self.min_p <= 1:
            raise ValueError("`min_p` must be >= 0.0 and <= 1.0")
        if self.repetition_penalty <= 0:
            raise ValueError("`repetition_penalty` must be strictly positive")
        if not -2 <= self.frequency_penalty <= 2:
            raise ValueError("`frequency_penalty` must be >= -2.0 and <= 2.0")
        if not -2 <= self.presence_penalty <= 2:
            raise ValueError("`presence_penalty` must be >= -2.0 and <= 2.0")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise ValueError("`seed` must be >= 0 and < 2**64")
        for n, name in ((self.logprobs, "logprobs"), (self.prompt_logprobs, "prompt_logprobs")):
            if n is not None and n < 0:
                raise ValueError(f"`{name}` must be >= 0")
        if self.grammar is not None:
            # Compiles it (size cap, llguidance's limits, a bounded cache): a GrammarError is
            # a ValueError carrying the compiler's message. Imported here: only when used.
            from tokenmill.guided import check_grammar

            check_grammar(self.grammar)

    @property
    def greedy(self) -> bool:
        # Temperatures this small only overflow the logits; treat them as greedy (vLLM does).
        return self.temperature < 1e-5


class TokenLogprob(msgspec.Struct, array_like=True):
    """One position's chosen-token logprob and, if asked for, the top alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = msgspec.field(default_factory=list)


class EngineRequest(msgspec.Struct, omit_defaults=True, kw_only=True):
    """What the front end hands the engine: tokenized prompt plus settings."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: list[int] = msgspec.field(default_factory=list)
    adapter_id: str | None = None
    arrival_time: float = 0.0


class EngineOutput(msgspec.Struct, omit_defaults=True, kw_only=True):
    """New tokens for one request from one engine step (a delta, not the whole text)."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: FinishReason | None = None
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # sent once, with the first token
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    seed: int | None = None  # the seed actually used, sent with the first token
