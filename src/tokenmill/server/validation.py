"""Request validation: parsed request models → (prompt ids, SamplingParams, response options).

TGI routes follow text-generation-inference's `router/src/validation.rs`: same checks, same
order, same messages (``Input validation error: `temperature` must be strictly positive``).
OpenAI routes follow OpenAI's semantics (temperature 0 = greedy, ``top_p`` may be 1.0, ``n``
choices, ``logprobs``/``top_logprobs``) with TGI's messages where the check is the same.

Policies (documented choices; tests in ``tests/server/test_srv_validation.py``):

* **Limits** default to TGI's launcher defaults; ``max_n`` (8) caps OpenAI's ``n`` and
  completions' ``best_of`` (vLLM's CVE-2026-34756: an unbounded ``n`` is an OOM);
  ``max_top_logprobs`` (20, OpenAI's documented maximum) caps ``top_logprobs`` and completions'
  ``logprobs``, while TGI's ``top_n_tokens`` keeps TGI's ``max_top_n_tokens`` (5).
* **max_new_tokens**: absent → the room left, ``max_total_tokens - input_len``. Present, it is
  checked as given (TGI clamps to 1024 for the total check and then re-queues in chunks; we do
  not), so ``2**64`` gives the total-tokens 422. Zero or negative → "must be strictly positive".
* **Greedy vs sampling** (TGI): with ``parameters`` absent, sampling is on. With ``parameters``
  present, decoding is greedy unless ``do_sample`` is true or a warper is active (temperature
  other than 1.0, top_k, top_p, typical_p), as in TGI's shard. For ``best_of`` "sampling"
  means do_sample or any of those fields *set*, as in TGI's router.
* **Stop sequences** on TGI routes are kept in ``generated_text`` (TGI does); on OpenAI routes
  they are removed (OpenAI does). Empty stop strings are refused everywhere.
* **top_k** at or above the vocabulary size means no filter (0); values are capped at 2**31-1
  so that nothing unbounded reaches the engine. Pass ``Limits.vocab_size``: without it,
  token-id prompts and logit_bias keys are only checked for ``>= 0``.
* **Whitespace-only input** is allowed (it tokenizes to real tokens, as in TGI); only an empty
  string, or one that tokenizes to nothing, is "`inputs` cannot be empty".
* **Adapters**: ``adapter_id`` (or a later ``model`` lookup) that is not loaded is a 422 (TGI
  silently falls back to the base model, issue #2505; we refuse).
* **Grammars** (TGI's ``grammar``, OpenAI's ``response_format``, see ``server/grammar.py``) are
  compiled here: one that does not compile, or is over the size cap, is a 422 carrying the
  compiler's message ("grammar is not valid: ..."), before the request is queued.
* **Tools** (``tools``, ``tool_choice``, ``parallel_tool_calls``, TGI's ``tool_prompt``): see
  ``server/tools.py`` (422 ``tool_error`` for malformed tools, duplicate names, a missing named
  function, over 128 tools, a schema that does not compile, or tools with ``response_format``).
* **Not yet supported** features are refused with a 422 rather than ignored: ``logit_bias``
  (validated first, so a malformed map gets its own message), completions' ``suffix``, image
  content parts.
* **Chat templates**: ``chat_template_kwargs`` keys must be in :data:`ALLOWED_CHAT_TEMPLATE_KWARGS`
  (CVE-2025-62426: kwargs must never override ``messages``, ``add_generation_prompt``,
  ``tools``, special tokens, ...). A template failure (``raise_exception``, sandbox, time cap)
  is a 422 ``template_error``.
* **Special-token text in message content** (``"<|im_end|>"`` in a user message) is passed
  through unchanged and is parsed as the special token when the prompt is encoded, as in TGI,
  vLLM and transformers. The API caller already controls the whole prompt (``/generate`` takes
  raw text), so this forges nothing it could not send directly; an application that forwards
  *third-party* text into messages must sanitize it. See :func:`chat_request_to_prompt`.
* **Last message from the assistant**: the prompt continues that message (rendered without a
  generation prompt and cut right after its content), as TGI does.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tokenmill.protocol import SamplingParams
from tokenmill.server.errors import (
    BatchSizeError,
    InputValidationError,
    SuffixNotSupportedError,
    TemplateError,
)
from tokenmill.tokenizer.chat_template import ChatTemplateError

from .grammar import response_format_grammar, tgi_grammar
from .schemas import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    GenerateParameters,
    GenerateRequest,
    ImageUrlContentPart,
)
from .tools import ToolPlan, render_chat, template_tool_calls, tool_grammar, tool_plan

if TYPE_CHECKING:
    from tokenmill.tokenizer import Tokenizer

__all__ = [
    "ALLOWED_CHAT_TEMPLATE_KWARGS",
    "SEED_LIMIT",
    "ChatOptions",
    "CompletionOptions",
    "GenerateOptions",
    "Limits",
    "chat_messages",
    "chat_request_to_prompt",
    "check_prompt_length",
    "choice_params",
    "completion_prompts",
    "parse_logit_bias",
    "validate_chat",
    "validate_completion",
    "validate_completion_prompt",
    "validate_generate",
]

SEED_LIMIT = 2**64

#: chat_template_kwargs keys a client may set. Everything else (``messages``, ``tools``,
#: ``add_generation_prompt``, ``tokenize``, ``bos_token``, ...) is ours to decide.
ALLOWED_CHAT_TEMPLATE_KWARGS: frozenset[str] = frozenset(
    {"enable_thinking", "thinking", "reasoning_effort", "documents"}
)

_CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})


# ============================================================================ limits


@dataclass(frozen=True, kw_only=True)
class Limits:
    """Server-wide request limits (TGI launcher flags and their defaults, plus OpenAI caps)."""

    max_input_tokens: int
    max_total_tokens: int
    max_concurrent_requests: int = 128
    max_best_of: int = 2
    max_stop_sequences: int = 4
    max_top_n_tokens: int = 5
    max_client_batch_size: int = 4
    max_n: int = 8
    max_top_logprobs: int = 20
    max_logit_bias: int = 300
    #: Number of valid token ids (token-id prompts, logit_bias keys); None skips the upper check.
    vocab_size: int | None = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "vocab_size" and v is None:
                continue
            if not isinstance(v, int) or v < (0 if f.name == "max_top_n_tokens" else 1):
                raise ValueError(f"`{f.name}` must be a positive integer, got {v!r}")
        if self.max_input_tokens >= self.max_total_tokens:
            raise ValueError("`max_input_tokens` must be < `max_total_tokens`")

    @classmethod
    def from_model(
        cls,
        max_model_len: int,
        *,
        max_input_tokens: int | None = None,
        max_total_tokens: int | None = None,
        **overrides: Any,
    ) -> Limits:
        """TGI's defaults: ``max_total_tokens = max_model_len``, ``max_input_tokens =
        max_total_tokens - 1``. Raises ValueError when the values do not fit the model or
        ``max_input_tokens >= max_total_tokens``."""
        if max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {max_model_len}")
        total = max_model_len if max_total_tokens is None else max_total_tokens
        if total > max_model_len:
            raise ValueError(
                f"`max_total_tokens` ({total}) must be <= the model's maximum length"
                f" ({max_model_len})"
            )
        inp = total - 1 if max_input_tokens is None else max_input_tokens
        return cls(max_input_tokens=inp, max_total_tokens=total, **overrides)


def _invalid(message: str) -> InputValidationError:
    return InputValidationError(message)


# ============================================================================ shared checks


def _finite(name: str, v: float | None) -> None:
    # pydantic already refuses NaN/Infinity; this guards callers that build models directly.
    if v is not None and not math.isfinite(v):
        raise _invalid(f"`{name}` must be a finite number")


def _check_seed(seed: int | None) -> None:
    if seed is not None and not 0 <= seed < SEED_LIMIT:
        raise _invalid(f"`seed` must be >= 0 and < 2**64. Given: {seed}")


def _check_stop(stop: Sequence[str], limits: Limits) -> list[str]:
    if len(stop) > limits.max_stop_sequences:
        raise _invalid(
            f"`stop` supports up to {limits.max_stop_sequences} stop sequences. Given: {len(stop)}"
        )
    if any(s == "" for s in stop):
        raise _invalid("`stop` sequences cannot be empty strings")
    return list(stop)


def check_prompt_length(input_len: int, max_new_tokens: int | None, limits: Limits) -> int:
    """TGI's length checks; returns max_new_tokens (absent → the room left).

    Raises the 422s "`inputs` cannot be empty", "`inputs` must have less than {max_input}
    tokens. Given: {n}" and "`inputs` tokens + `max_new_tokens` must be <= {max_total}. ..."."""
    if input_len == 0:
        raise _invalid("`inputs` cannot be empty")
    if max_new_tokens is not None and max_new_tokens <= 0:
        raise _invalid("`max_new_tokens` must be strictly positive")
    if input_len > limits.max_input_tokens:
        raise _invalid(
            f"`inputs` must have less than {limits.max_input_tokens} tokens. Given: {input_len}"
        )
    if max_new_tokens is None:
        return limits.max_total_tokens - input_len
    if input_len + max_new_tokens > limits.max_total_tokens:
        raise _invalid(
            f"`inputs` tokens + `max_new_tokens` must be <= {limits.max_total_tokens}. Given:"
            f" {input_len} `inputs` tokens and {max_new_tokens} `max_new_tokens`"
        )
    return max_new_tokens


def _check_adapter(adapter_id: str | None, adapters: Collection[str]) -> str | None:
    if adapter_id is None or adapter_id == "":
        return None
    if adapter_id not in adapters:
        raise _invalid(f"adapter '{adapter_id}' is not loaded")
    return adapter_id


def _clamp_top_k(top_k: int, limits: Limits) -> int:
    """A top_k that keeps every token is no filter (0); huge values never reach the engine
    (msgpack carries at most 64-bit integers)."""
    if limits.vocab_size is not None and top_k >= limits.vocab_size:
        return 0
    return min(top_k, 2**31 - 1)


def _finalize(params: SamplingParams) -> SamplingParams:
    """Run SamplingParams' own checks (belt and braces): any ValueError becomes a 422."""
    try:
        params.validate()
    except ValueError as e:
        raise _invalid(str(e)) from e
    return params


# ============================================================================ TGI


@dataclass
class GenerateOptions:
    """What the TGI response builders need beyond the RequestOutput."""

    details: bool = False
    decoder_input_details: bool = False
    return_full_text: bool = False
    best_of: int = 1
    top_n_tokens: int = 0
    stream: bool = False
    adapter_id: str | None = None
    #: False for greedy decoding: `details.seed` is then null, as in TGI.
    sampling: bool = True


def _tgi_best_of(p: GenerateParameters, stream: bool, limits: Limits) -> int:
    # Stream-only refusals first, as TGI's generate_stream handler does.
    best_of = 1 if p.best_of is None else p.best_of
    if stream and best_of > 1:
        raise _invalid("`best_of` != 1 is not supported when streaming tokens")
    if stream and p.decoder_input_details:
        raise _invalid("`decoder_input_details` == true is not supported when streaming tokens")
    if best_of != 1:
        if limits.max_best_of == 1:
            raise _invalid("`best_of` != 1 is not allowed for this endpoint")
        if not 0 < best_of <= limits.max_best_of:
            raise _invalid(
                f"`best_of` must be > 0 and <= {limits.max_best_of}. Given: {best_of}"
            )
    return best_of


def _tgi_ranges(p: GenerateParameters, best_of: int) -> None:
    """The numeric parameters, in TGI's order and with its messages."""
    for name in ("temperature", "repetition_penalty", "frequency_penalty", "top_p", "typical_p"):
        _finite(name, getattr(p, name))
    sampling = bool(p.do_sample) or any(
        v is not None for v in (p.temperature, p.top_k, p.top_p, p.typical_p)
    )
    if best_of > 1 and not sampling:
        raise _invalid("you must use sampling when `best_of` is > 1")
    if p.temperature is not None and p.temperature <= 0:
        raise _invalid("`temperature` must be strictly positive")
    if p.repetition_penalty is not None and p.repetition_penalty <= 0:
        raise _invalid("`repetition_penalty` must be strictly positive")
    if p.frequency_penalty is not None and not -2.0 <= p.frequency_penalty <= 2.0:
        raise _invalid("`frequency_penalty` must be >= -2.0 and <= 2.0")
    if p.top_p is not None and not 0.0 < p.top_p < 1.0:
        raise _invalid("`top_p` must be > 0.0 and < 1.0")
    if p.typical_p is not None and not 0.0 < p.typical_p < 1.0:
        raise _invalid("`typical_p` must be > 0.0 and < 1.0")
    if p.top_k is not None and p.top_k <= 0:
        raise _invalid("`top_k` must be strictly positive")
    if p.max_new_tokens is not None and p.max_new_tokens <= 0:
        raise _invalid("`max_new_tokens` must be strictly positive")


def _tgi_request_checks(req: GenerateRequest, p: GenerateParameters, best_of: int,
                        limits: Limits, adapters: Collection[str]
                        ) -> tuple[list[str], int, str | None]:
    """Stop sequences, seed, top_n_tokens, inputs, truncate, features not yet supported and
    the adapter; returns (stop, top_n_tokens, adapter_id)."""
    stop = _check_stop(p.stop or [], limits)
    if p.seed is not None and best_of > 1:
        raise _invalid("`seed` must not be set when `best_of` > 1")
    _check_seed(p.seed)
    top_n_tokens = 0 if p.top_n_tokens is None else p.top_n_tokens
    if not 0 <= top_n_tokens <= limits.max_top_n_tokens:
        raise _invalid(
            f"`top_n_tokens` must be >= 0 and <= {limits.max_top_n_tokens}. Given: {top_n_tokens}"
        )
    if req.inputs == "":
        raise _invalid("`inputs` cannot be empty")
    if p.truncate is not None and not 0 < p.truncate <= limits.max_input_tokens:
        raise _invalid(
            f"`truncate` must be strictly positive and less than {limits.max_input_tokens}."
            f" Given: {p.truncate}"
        )
    return stop, top_n_tokens, _check_adapter(p.adapter_id, adapters)


def validate_generate(
    req: GenerateRequest,
    input_ids: list[int],
    limits: Limits,
    *,
    stream: bool,
    default_return_full_text: bool = False,
    adapters: Collection[str] = (),
) -> tuple[list[int], SamplingParams, GenerateOptions]:
    """Validate a TGI generate request whose `inputs` tokenized to `input_ids`.

    Returns the (possibly truncated) prompt ids, the SamplingParams and the response options.
    Raises :class:`InputValidationError` with TGI's messages. `stream` is the route's (the
    `/generate_stream` route, or `stream` on `/`); `default_return_full_text` is the route's
    default (true on `/` for text-generation models); `adapters` are the loaded adapter ids.
    """
    p = req.parameters if req.parameters is not None else GenerateParameters(do_sample=True)
    best_of = _tgi_best_of(p, stream, limits)
    _tgi_ranges(p, best_of)
    stop, top_n_tokens, adapter_id = _tgi_request_checks(req, p, best_of, limits, adapters)
    do_sample = bool(p.do_sample)
    temperature = 1.0 if p.temperature is None else p.temperature
    repetition_penalty = 1.0 if p.repetition_penalty is None else p.repetition_penalty
    frequency_penalty = 0.0 if p.frequency_penalty is None else p.frequency_penalty

    ids = list(input_ids)
    if p.truncate is not None and len(ids) > p.truncate:
        ids = ids[-p.truncate:]
    max_new_tokens = check_prompt_length(len(ids), p.max_new_tokens, limits)

    decoder_input_details = bool(p.decoder_input_details)
    details = bool(p.details) or decoder_input_details
    greedy = not do_sample and (
        temperature == 1.0 and p.top_k is None and p.top_p is None and p.typical_p is None
    )
    # Chosen-token logprobs are needed for details.tokens, stream tokens and best_of ranking.
    if top_n_tokens > 0:
        logprobs: int | None = top_n_tokens
    elif details or stream or best_of > 1:
        logprobs = 0
    else:
        logprobs = None
    params = SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=0.0 if greedy else temperature,
        top_k=0 if p.top_k is None else _clamp_top_k(p.top_k, limits),
        top_p=1.0 if p.top_p is None else p.top_p,
        typical_p=1.0 if p.typical_p is None else p.typical_p,
        repetition_penalty=repetition_penalty,
        frequency_penalty=frequency_penalty,
        seed=p.seed,
        stop=stop,
        include_stop_str_in_output=True,  # TGI keeps the stop sequence in generated_text
        logprobs=logprobs,
        # TGI's prefill entries carry no alternatives: chosen-token logprobs are enough.
        prompt_logprobs=0 if decoder_input_details else None,
        watermark=bool(p.watermark),
        grammar=tgi_grammar(p.grammar),
    )
    opts = GenerateOptions(
        details=details,
        decoder_input_details=decoder_input_details,
        return_full_text=(
            default_return_full_text if p.return_full_text is None else p.return_full_text
        ),
        best_of=best_of,
        top_n_tokens=top_n_tokens,
        stream=stream,
        adapter_id=adapter_id,
        sampling=not greedy,
    )
    return ids, _finalize(params), opts


# ============================================================================ OpenAI shared


def parse_logit_bias(raw: dict[str, float] | None, limits: Limits) -> dict[int, float]:
    """Check an OpenAI `logit_bias` map: at most `max_logit_bias` entries, keys are token ids
    in [0, vocab_size), values in [-100, 100]. Returns it with int keys."""
    if not raw:
        return {}
    if len(raw) > limits.max_logit_bias:
        raise _invalid(
            f"`logit_bias` supports up to {limits.max_logit_bias} entries. Given: {len(raw)}"
        )
    out: dict[int, float] = {}
    for key, value in raw.items():
        try:
            token_id = int(key.strip())
        except ValueError:
            raise _invalid(f"`logit_bias` keys must be token ids. Given: {key!r}") from None
        if token_id < 0 or (limits.vocab_size is not None and token_id >= limits.vocab_size):
            bound = "" if limits.vocab_size is None else f" and < {limits.vocab_size}"
            raise _invalid(f"`logit_bias` token ids must be >= 0{bound}. Given: {token_id}")
        if not (math.isfinite(value) and -100 <= value <= 100):
            raise _invalid(f"`logit_bias` values must be >= -100 and <= 100. Given: {value}")
        out[token_id] = float(value)
    return out


def _openai_params(
    *,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    min_p: float | None,
    frequency_penalty: float | None,
    presence_penalty: float | None,
    repetition_penalty: float | None,
    seed: int | None,
    stop: str | list[str] | None,
    logit_bias: dict[str, float] | None,
    ignore_eos: bool | None,
    limits: Limits,
) -> SamplingParams:
    for name, v in (("temperature", temperature), ("top_p", top_p), ("min_p", min_p),
                    ("frequency_penalty", frequency_penalty),
                    ("presence_penalty", presence_penalty),
                    ("repetition_penalty", repetition_penalty)):
        _finite(name, v)
    t = 1.0 if temperature is None else temperature
    if not 0.0 <= t <= 2.0:  # OpenAI's documented range
        raise _invalid("`temperature` must be >= 0.0 and <= 2.0")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise _invalid("`top_p` must be > 0.0 and <= 1.0")
    k = 0 if top_k is None or top_k == -1 else top_k
    if k < 0:
        raise _invalid("`top_k` must be -1 (disabled) or >= 0")
    if min_p is not None and not 0.0 <= min_p <= 1.0:
        raise _invalid("`min_p` must be >= 0.0 and <= 1.0")
    for name, v in (("frequency_penalty", frequency_penalty),
                    ("presence_penalty", presence_penalty)):
        if v is not None and not -2.0 <= v <= 2.0:
            raise _invalid(f"`{name}` must be >= -2.0 and <= 2.0")
    if repetition_penalty is not None and repetition_penalty <= 0:
        raise _invalid("`repetition_penalty` must be strictly positive")
    _check_seed(seed)
    stops = _check_stop([stop] if isinstance(stop, str) else (stop or []), limits)
    if parse_logit_bias(logit_bias, limits):
        raise _invalid("logit_bias is not supported yet")
    return SamplingParams(
        temperature=t,
        top_p=1.0 if top_p is None else top_p,
        top_k=_clamp_top_k(k, limits),
        min_p=0.0 if min_p is None else min_p,
        frequency_penalty=0.0 if frequency_penalty is None else frequency_penalty,
        presence_penalty=0.0 if presence_penalty is None else presence_penalty,
        repetition_penalty=1.0 if repetition_penalty is None else repetition_penalty,
        seed=seed,
        stop=stops,
        ignore_eos=bool(ignore_eos),
    )


def _check_n(n: int | None, limits: Limits) -> int:
    n = 1 if n is None else n
    if not 0 < n <= limits.max_n:
        raise _invalid(f"`n` must be > 0 and <= {limits.max_n}. Given: {n}")
    return n


def choice_params(params: SamplingParams, index: int) -> SamplingParams:
    """The params of choice `index` of an ``n > 1`` request: with a seed, choice i uses
    ``seed + i`` (mod 2**64) so the choices differ but stay reproducible; without one, the
    engine draws a seed per choice."""
    if params.seed is None or index == 0:
        return params
    import msgspec

    return msgspec.structs.replace(params, seed=(params.seed + index) % SEED_LIMIT)


# ============================================================================ chat


@dataclass
class ChatOptions:
    n: int = 1
    logprobs: bool = False
    top_logprobs: int = 0
    stream: bool = False
    include_usage: bool = False
    model: str = ""
    #: The request's tools when its answer is constrained to call them (see server/tools.py).
    tools: ToolPlan | None = None


def _message_text(m: ChatMessage) -> str | None:
    if m.content is None or isinstance(m.content, str):
        return m.content
    parts: list[str] = []
    for part in m.content:
        if isinstance(part, ImageUrlContentPart):
            raise _invalid("image inputs are not supported by this model")
        parts.append(part.text)
    return "".join(parts)


def chat_messages(req: ChatCompletionRequest) -> list[dict[str, Any]]:
    """The request's messages as template input: text parts joined (TGI joins with ""),
    ``developer`` mapped to ``system``, None content of assistant messages made ""."""
    if not req.messages:
        raise _invalid("`messages` cannot be empty")
    out: list[dict[str, Any]] = []
    for i, m in enumerate(req.messages):
        role = "system" if m.role == "developer" else m.role
        if role not in _CHAT_ROLES:
            raise _invalid(
                f"messages[{i}]: unsupported role '{m.role}' (expected system, developer, user,"
                " assistant or tool)"
            )
        content = _message_text(m)
        if content is None:
            if role != "assistant":
                raise _invalid(f"messages[{i}]: `content` is required for {role} messages")
            content = ""
        msg: dict[str, Any] = {"role": role, "content": content}
        if role == "tool":
            if not m.tool_call_id:
                raise _invalid(f"messages[{i}]: tool messages must have a `tool_call_id`")
            msg["tool_call_id"] = m.tool_call_id
        if m.name is not None:
            msg["name"] = m.name
        if m.tool_calls:
            if role != "assistant":
                raise _invalid(f"messages[{i}]: only assistant messages may have `tool_calls`")
            msg["tool_calls"] = template_tool_calls(i, m.tool_calls)
        out.append(msg)
    return out


def _template_kwargs(
    req: ChatCompletionRequest, allowed: Collection[str]
) -> dict[str, Any]:
    kwargs = dict(req.chat_template_kwargs or {})
    bad = sorted(k for k in kwargs if k not in allowed)
    if bad:
        raise _invalid(
            f"`chat_template_kwargs` key '{bad[0]}' is not allowed (allowed:"
            f" {', '.join(sorted(allowed)) or 'none'})"
        )
    return kwargs


def chat_request_to_prompt(
    tokenizer: Tokenizer,
    req: ChatCompletionRequest,
    *,
    allowed_template_kwargs: Collection[str] = ALLOWED_CHAT_TEMPLATE_KWARGS,
) -> str:
    """Render the request's messages with the model's chat template.

    The result is prompt *text*; encode it with ``add_special_tokens=False`` (the template
    adds BOS and friends). Special-token text inside message content is left as is, so it is
    parsed as special tokens when encoded (see the module docstring for this policy).

    If the last message is from the assistant, the prompt continues it: rendered without a
    generation prompt and cut right after that message's content (TGI's "continue final
    message"); if the template transforms the content so that it cannot be found, the whole
    render is used. An empty final assistant message (no tool calls) is dropped instead, and
    the model starts a fresh reply.

    Tools (``tools``, ``tool_choice``) are rendered as ``server/tools.py`` describes.

    Raises InputValidationError (messages, roles, kwargs, image parts), ToolError (tools) and
    TemplateError (the template failed or is missing).
    """
    messages = chat_messages(req)
    plan = tool_plan(req)
    kwargs = _template_kwargs(req, allowed_template_kwargs)
    documents = kwargs.pop("documents", None)
    if messages[-1]["role"] == "assistant" and messages[-1]["content"] == "" \
            and "tool_calls" not in messages[-1]:
        messages.pop()  # an empty final assistant message asks for a fresh reply
        if not messages:
            raise _invalid("`messages` cannot be empty")
    continue_final = messages[-1]["role"] == "assistant"

    def render(msgs: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
               add_generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            msgs, add_generation_prompt=add_generation_prompt, tools=tools,
            documents=documents, **kwargs)

    try:
        text = render_chat(render, messages, plan, add_generation_prompt=not continue_final)
    except ChatTemplateError as e:
        raise TemplateError(str(e)) from e
    if continue_final:
        final = messages[-1]["content"]
        cut = text.rfind(final) if final else -1
        if cut >= 0:
            text = text[: cut + len(final)]
    return text


def validate_chat(
    req: ChatCompletionRequest,
    input_ids: list[int],
    limits: Limits,
    *,
    default_model: str = "tgi",
) -> tuple[SamplingParams, ChatOptions]:
    """Validate a chat request whose rendered prompt encoded to `input_ids`.

    OpenAI semantics: temperature defaults to 1.0 and 0 means greedy; ``max_completion_tokens``
    wins over ``max_tokens``, and when neither is given the room left in max_total_tokens is
    used; the stop sequence is not part of the content."""
    if not req.messages:
        raise _invalid("`messages` cannot be empty")
    plan = tool_plan(req)
    n = _check_n(req.n, limits)
    want_logprobs = bool(req.logprobs)
    top = 0 if req.top_logprobs is None else req.top_logprobs
    if not 0 <= top <= limits.max_top_logprobs:
        raise _invalid(
            f"`top_logprobs` must be >= 0 and <= {limits.max_top_logprobs}. Given: {top}"
        )
    if req.top_logprobs is not None and top > 0 and not want_logprobs:
        raise _invalid("`top_logprobs` requires `logprobs` to be true")
    params = _openai_params(
        temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
        frequency_penalty=req.frequency_penalty, presence_penalty=req.presence_penalty,
        repetition_penalty=req.repetition_penalty, seed=req.seed, stop=req.stop,
        logit_bias=req.logit_bias, ignore_eos=req.ignore_eos, limits=limits,
    )
    requested = req.max_completion_tokens if req.max_completion_tokens is not None \
        else req.max_tokens
    params.max_new_tokens = check_prompt_length(len(input_ids), requested, limits)
    params.logprobs = top if want_logprobs else None
    params.grammar = tool_grammar(plan) if plan is not None \
        else response_format_grammar(req.response_format)
    stream = bool(req.stream)
    opts = ChatOptions(
        n=n,
        logprobs=want_logprobs,
        top_logprobs=top if want_logprobs else 0,
        stream=stream,
        include_usage=stream and bool(req.stream_options and req.stream_options.include_usage),
        model=req.model or default_model,
        tools=plan,
    )
    return _finalize(params), opts


# ============================================================================ completions


@dataclass
class CompletionOptions:
    n: int = 1
    best_of: int = 1
    logprobs: int | None = None
    echo: bool = False
    stream: bool = False
    include_usage: bool = False
    model: str = ""
    #: The requested max_tokens; None: the room left in max_total_tokens.
    max_tokens: int | None = 16


def completion_prompts(
    req: CompletionRequest, limits: Limits
) -> list[str | list[int]]:
    """The request's prompts as a list of strings or token-id lists (not yet encoded).

    Refuses an empty prompt list, more than `max_client_batch_size` prompts (TGI's
    "batch size exceeded" 422), empty prompts, and token ids outside [0, vocab_size)."""
    raw = req.prompt
    prompts: list[str | list[int]]
    if isinstance(raw, str):
        prompts = [raw]
    elif not raw:
        raise _invalid("`prompt` cannot be empty")
    elif isinstance(raw[0], int):
        prompts = [[int(t) for t in raw if isinstance(t, int)]]
    else:
        prompts = [p if isinstance(p, str) else list(p) for p in raw if not isinstance(p, int)]
    if len(prompts) > limits.max_client_batch_size:
        raise BatchSizeError(limits.max_client_batch_size)
    for p in prompts:
        if len(p) == 0:
            raise _invalid("`inputs` cannot be empty")
        if isinstance(p, list):
            for t in p:
                if t < 0 or (limits.vocab_size is not None and t >= limits.vocab_size):
                    bound = "" if limits.vocab_size is None else f" and < {limits.vocab_size}"
                    raise _invalid(f"`prompt` token ids must be >= 0{bound}. Given: {t}")
    return prompts


def validate_completion(
    req: CompletionRequest,
    limits: Limits,
    *,
    default_model: str = "tgi",
) -> tuple[list[str | list[int]], SamplingParams, CompletionOptions]:
    """Validate a legacy completions request.

    Returns the prompts (strings or token ids, see :func:`completion_prompts`), SamplingParams
    and the options. ``max_tokens`` defaults to 16 (OpenAI); an explicit null means the room
    left. Each prompt must then go through :func:`validate_completion_prompt` once encoded,
    which checks its length and resolves `max_new_tokens` for it."""
    if req.suffix:
        raise SuffixNotSupportedError()
    prompts = completion_prompts(req, limits)
    n = _check_n(req.n, limits)
    best_of = n if req.best_of is None else req.best_of
    if not n <= best_of <= limits.max_n:
        raise _invalid(f"`best_of` must be >= `n` and <= {limits.max_n}. Given: {best_of}")
    stream = bool(req.stream)
    if stream and best_of != n:
        raise _invalid("`best_of` != `n` is not supported when streaming tokens")
    lp = req.logprobs
    if lp is not None and not 0 <= lp <= limits.max_top_logprobs:
        raise _invalid(f"`logprobs` must be >= 0 and <= {limits.max_top_logprobs}. Given: {lp}")
    if req.max_tokens is not None and req.max_tokens <= 0:
        raise _invalid("`max_tokens` must be strictly positive")
    params = _openai_params(
        temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
        frequency_penalty=req.frequency_penalty, presence_penalty=req.presence_penalty,
        repetition_penalty=req.repetition_penalty, seed=req.seed, stop=req.stop,
        logit_bias=req.logit_bias, ignore_eos=req.ignore_eos, limits=limits,
    )
    # Resolved per prompt by validate_completion_prompt (null: the room left).
    params.max_new_tokens = limits.max_total_tokens if req.max_tokens is None else req.max_tokens
    params.grammar = response_format_grammar(req.response_format)  # as vLLM accepts it here
    echo = bool(req.echo)
    if lp is not None or best_of > n:
        params.logprobs = lp or 0  # best_of ranking needs the chosen-token logprobs
    if echo and lp is not None:
        params.prompt_logprobs = lp
    opts = CompletionOptions(
        n=n,
        best_of=best_of,
        logprobs=lp,
        echo=echo,
        stream=stream,
        include_usage=stream and bool(req.stream_options and req.stream_options.include_usage),
        model=req.model or default_model,
        max_tokens=req.max_tokens,
    )
    return prompts, _finalize(params), opts


def validate_completion_prompt(
    input_ids: list[int], params: SamplingParams, opts: CompletionOptions, limits: Limits
) -> SamplingParams:
    """Length checks for one encoded completions prompt; returns a copy of `params` with
    `max_new_tokens` resolved for it (the room left when ``max_tokens`` was null)."""
    import msgspec

    max_new = check_prompt_length(len(input_ids), opts.max_tokens, limits)
    return _finalize(msgspec.structs.replace(params, max_new_tokens=max_new))
