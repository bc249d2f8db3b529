"""Response bodies (plain dicts, ready for orjson) built from RequestOutputs.

Pure functions, no I/O. TGI shapes follow text-generation-inference (``GenerateResponse``,
``StreamResponse``); OpenAI shapes validate against the openai client's pydantic types.

Choices made here:

* TGI ``finish_reason`` is our FinishReason value (``length``, ``eos_token``,
  ``stop_sequence``); an aborted or unfinished output reports ``length``. OpenAI maps EOS and
  stop strings to ``stop`` and LENGTH to ``length``.
* ``details.seed`` is null for greedy requests (TGI reports the seed only when sampling).
* Token texts are :meth:`Tokenizer.id_to_token` (`` Paris``, not ``ĠParis``); a token that is
  part of a multi-byte character shows U+FFFD, while OpenAI's ``bytes`` field carries its raw
  bytes.
* Logprobs of -inf (or NaN) are sent as -9999.0, as OpenAI does, never as JSON null.
* Completions with ``echo`` and ``logprobs``: the first prompt token's logprob is null, and
  stream chunks have ``finish_reason: null`` until the last, as OpenAI's API sends them (the
  openai client's types are stricter, but it does not validate responses).
* **Errors**: TGI routes get TGI's ``{"error": message, "error_type": type}``. OpenAI routes
  get ``{"error": {"message", "type", "param", "code"}, "error_type": type}``: the openai
  client reads ``body["error"]["message"]`` (and ``type``/``code``), huggingface_hub prints
  ``error``, and TGI-aware tools still find ``error_type`` at the top level.
"""

from __future__ import annotations

import math
import re
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from tokenmill.protocol import FinishReason, TokenLogprob
from tokenmill.tokenizer.gguf_tokenizer import bytes_to_unicode

from .errors import RequestError
from .validation import ChatOptions, CompletionOptions, GenerateOptions

if TYPE_CHECKING:
    from tokenmill.frontend.outputs import RequestOutput
    from tokenmill.tokenizer import Tokenizer

__all__ = [
    "chat_chunk",
    "chat_completion",
    "completion",
    "completion_chunk",
    "error_body",
    "generate_response",
    "model_list",
    "pick_best_of",
    "request_error_body",
    "simple_tokens",
    "stream_error_body",
    "stream_event",
    "tgi_finish_reason",
    "token_bytes",
    "usage",
    "usage_chunk",
]


# ============================================================================ helpers


def tgi_finish_reason(reason: FinishReason | None) -> str:
    if reason is None or reason is FinishReason.ABORT:
        return FinishReason.LENGTH.value
    return reason.value


def _openai_finish_reason(reason: FinishReason | None) -> str:
    return "length" if reason is None else reason.openai


def _lp(v: float) -> float:
    """A JSON-safe logprob: -inf (a token of probability 0) becomes the most negative float
    rather than orjson's null, so the openai client's `float` fields accept it."""
    v = float(v)
    if math.isnan(v):
        return -9999.0
    if math.isinf(v):
        return -9999.0 if v < 0 else 0.0
    return v


def _new_logprobs(out: RequestOutput) -> list[TokenLogprob] | None:
    """The logprobs of this update's new tokens (out.logprobs is cumulative)."""
    if out.logprobs is None:
        return None
    start = len(out.token_ids) - len(out.new_token_ids)
    return out.logprobs[start:start + len(out.new_token_ids)]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


# -------------------------------------------------------------------- token bytes

_UNICODE_TO_BYTE = {c: b for b, c in bytes_to_unicode().items()}
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_BYTE_LEVEL: weakref.WeakKeyDictionary[Tokenizer, bool] = weakref.WeakKeyDictionary()


def _is_byte_level(tokenizer: Tokenizer) -> bool:
    cached = _BYTE_LEVEL.get(tokenizer)
    if cached is None:
        decoder = getattr(tokenizer.backend, "decoder", None)
        cached = decoder is not None and "ByteLevel" in type(decoder).__name__
        _BYTE_LEVEL[tokenizer] = cached
    return cached


def token_bytes(tokenizer: Tokenizer, token_id: int) -> list[int]:
    """The raw UTF-8 bytes of one token (OpenAI's `bytes`): exact for byte-level BPE and
    SentencePiece byte-fallback tokens, else the UTF-8 of its display text."""
    raw = tokenizer.raw_token(token_id)
    if raw is not None and token_id not in tokenizer.all_special_ids:
        m = _BYTE_FALLBACK.fullmatch(raw)
        if m:
            return [int(m.group(1), 16)]
        if _is_byte_level(tokenizer) and all(c in _UNICODE_TO_BYTE for c in raw):
            return [_UNICODE_TO_BYTE[c] for c in raw]
    return list(tokenizer.id_to_token(token_id).encode("utf-8"))


# ============================================================================ TGI


def _tgi_token(tokenizer: Tokenizer, token_id: int, logprob: float | None) -> dict[str, Any]:
    return {
        "id": token_id,
        "text": tokenizer.id_to_token(token_id),
        "logprob": None if logprob is None else _lp(logprob),
        "special": token_id in tokenizer.all_special_ids,
    }


def _tgi_tokens(
    tokenizer: Tokenizer, ids: Sequence[int], logprobs: Sequence[TokenLogprob] | None
) -> list[dict[str, Any]]:
    lps = logprobs or []
    return [
        _tgi_token(tokenizer, t, lps[i].logprob if i < len(lps) else None)
        for i, t in enumerate(ids)
    ]


def _tgi_top(tokenizer: Tokenizer, lp: TokenLogprob) -> list[dict[str, Any]]:
    return [_tgi_token(tokenizer, t, v) for t, v in lp.top]


def _prefill(
    out: RequestOutput, tokenizer: Tokenizer, opts: GenerateOptions, prompt_ids: Sequence[int]
) -> list[dict[str, Any]]:
    if not opts.decoder_input_details:
        return []
    plps = out.prompt_logprobs or []
    prefill = []
    for i, t in enumerate(prompt_ids):
        entry = plps[i] if i < len(plps) else None
        prefill.append({
            "id": t,
            "text": tokenizer.id_to_token(t),
            "logprob": None if i == 0 or entry is None else _lp(entry.logprob),
        })
    return prefill


def _sequence_details(
    out: RequestOutput,
    tokenizer: Tokenizer,
    opts: GenerateOptions,
    prompt_ids: Sequence[int],
) -> dict[str, Any]:
    d: dict[str, Any] = {
        "finish_reason": tgi_finish_reason(out.finish_reason),
        "generated_tokens": len(out.token_ids),
        "seed": out.seed if opts.sampling else None,
        "prefill": _prefill(out, tokenizer, opts, prompt_ids),
        "tokens": _tgi_tokens(tokenizer, out.token_ids, out.logprobs),
    }
    if opts.top_n_tokens > 0 and out.logprobs:
        d["top_tokens"] = [_tgi_top(tokenizer, lp) for lp in out.logprobs]
    return d


def _full_text(text: str, opts: GenerateOptions, prompt_text: str) -> str:
    return prompt_text + text if opts.return_full_text else text


def pick_best_of(outs: Sequence[RequestOutput]) -> tuple[RequestOutput, list[RequestOutput]]:
    """TGI's best_of choice: the sequence with the highest mean token logprob (ties: the
    first); returns (best, the others in their order)."""
    def score(o: RequestOutput) -> float:
        lps = o.logprobs or []
        return sum(lp.logprob for lp in lps) / len(lps) if lps else -math.inf

    best = max(range(len(outs)), key=lambda i: score(outs[i]))
    return outs[best], [o for i, o in enumerate(outs) if i != best]


def generate_response(
    out: RequestOutput,
    tokenizer: Tokenizer,
    opts: GenerateOptions,
    prompt_text: str,
    prompt_ids: Sequence[int],
    best_of_outs: Sequence[RequestOutput] | None = None,
) -> dict[str, Any]:
    """TGI's GenerateResponse for a finished `out` (``/generate``; ``/`` wraps it in a list).

    `prompt_ids` are the ids actually used (after `truncate`); `best_of_outs` are the other
    sequences of a best_of request (see :func:`pick_best_of`), reported in
    `details.best_of_sequences` when given."""
    body: dict[str, Any] = {"generated_text": _full_text(out.text, opts, prompt_text)}
    if opts.details:
        details = _sequence_details(out, tokenizer, opts, prompt_ids)
        if best_of_outs is not None:
            details["best_of_sequences"] = [
                {"generated_text": _full_text(o.text, opts, prompt_text),
                 **_sequence_details(o, tokenizer, opts, prompt_ids)}
                for o in best_of_outs
            ]
        body["details"] = details
    return body


def stream_event(
    out: RequestOutput,
    tokenizer: Tokenizer,
    opts: GenerateOptions,
    index: int | None,
    prompt_text: str,
    input_length: int,
) -> list[dict[str, Any]]:
    """TGI StreamResponse events for this update: one per new token.

    `index` is the number of tokens already sent for this request (None: derived from `out`);
    the events carry index+1, index+2, ... as TGI numbers tokens from 1. The last event of a
    finished output carries `generated_text` and, with details, `details`. A finished update
    with no new token gives no event (the caller decides how to end the stream)."""
    new = out.new_token_ids
    if index is None:
        index = len(out.token_ids) - len(new)
    lps = _new_logprobs(out) or []
    events: list[dict[str, Any]] = []
    for k, t in enumerate(new):
        lp = lps[k] if k < len(lps) else None
        ev: dict[str, Any] = {
            "index": index + k + 1,
            "token": _tgi_token(tokenizer, t, None if lp is None else lp.logprob),
        }
        if opts.top_n_tokens > 0 and lp is not None:
            ev["top_tokens"] = _tgi_top(tokenizer, lp)
        last = out.finished and k == len(new) - 1
        ev["generated_text"] = _full_text(out.text, opts, prompt_text) if last else None
        ev["details"] = {
            "finish_reason": tgi_finish_reason(out.finish_reason),
            "generated_tokens": len(out.token_ids),
            "seed": out.seed if opts.sampling else None,
            "input_length": input_length,
        } if last and opts.details else None
        events.append(ev)
    return events


def simple_tokens(
    tokenizer: Tokenizer, text: str, *, add_special_tokens: bool = True
) -> list[dict[str, Any]]:
    """TGI's ``/tokenize`` body: ``[{id, text, start, stop}]`` with character offsets into
    `text`; tokens the tokenizer adds (BOS) have start == stop == 0 and their own text."""
    # the batch calls release the GIL while they run (routes_service runs long texts here on
    # a worker thread)
    ids = tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0]
    enc = tokenizer.backend.encode_batch([text], add_special_tokens=False)[0]
    inner = list(enc.ids)
    offsets = list(enc.offsets)
    # Locate the plain encoding inside the full one (usually at 0 or after a BOS).
    at = 0
    for s in range(len(ids) - len(inner) + 1):
        if ids[s:s + len(inner)] == inner:
            at = s
            break
    out = []
    for i, t in enumerate(ids):
        j = i - at
        if 0 <= j < len(inner) and inner[j] == t:
            start, stop = offsets[j]
            out.append({"id": t, "text": text[start:stop], "start": start, "stop": stop})
        else:
            out.append({"id": t, "text": tokenizer.id_to_token(t), "start": 0, "stop": 0})
    return out


# ============================================================================ OpenAI chat


def _chat_logprob_entry(tokenizer: Tokenizer, lp: TokenLogprob, top_n: int) -> dict[str, Any]:
    return {
        "token": tokenizer.id_to_token(lp.token_id),
        "logprob": _lp(lp.logprob),
        "bytes": token_bytes(tokenizer, lp.token_id),
        "top_logprobs": [
            {"token": tokenizer.id_to_token(t), "logprob": _lp(v),
             "bytes": token_bytes(tokenizer, t)}
            for t, v in lp.top[:top_n]
        ],
    }


def _chat_logprobs(
    tokenizer: Tokenizer, lps: Sequence[TokenLogprob] | None, opts: ChatOptions
) -> dict[str, Any] | None:
    if not opts.logprobs:
        return None
    return {"content": [_chat_logprob_entry(tokenizer, lp, opts.top_logprobs)
                        for lp in lps or []]}


def _openai_head(
    obj: str, request_id: str, created: int, model: str, system_fingerprint: str | None
) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": obj,
        "created": created,
        "model": model,
        "system_fingerprint": system_fingerprint,
    }


def chat_completion(
    outs: Sequence[RequestOutput],
    model: str,
    created: int,
    request_id: str,
    tokenizer: Tokenizer,
    opts: ChatOptions,
    prompt_tokens: int,
    *,
    system_fingerprint: str | None = None,
) -> dict[str, Any]:
    """A ``chat.completion`` with one choice per output (choice i = outs[i])."""
    body = _openai_head("chat.completion", request_id, created, model, system_fingerprint)
    body["choices"] = [
        {
            "index": i,
            "message": {"role": "assistant", "content": o.text},
            "logprobs": _chat_logprobs(tokenizer, o.logprobs, opts),
            "finish_reason": _openai_finish_reason(o.finish_reason),
        }
        for i, o in enumerate(outs)
    ]
    body["usage"] = usage(prompt_tokens, sum(len(o.token_ids) for o in outs))
    return body


def chat_chunk(
    out: RequestOutput,
    model: str,
    created: int,
    request_id: str,
    tokenizer: Tokenizer,
    opts: ChatOptions,
    *,
    index: int = 0,
    first: bool = False,
    system_fingerprint: str | None = None,
) -> dict[str, Any]:
    """One ``chat.completion.chunk`` for this update of choice `index`: the delta text (with
    ``role`` when `first`), the new tokens' logprobs, and the finish_reason when finished.
    `usage` is null (see :func:`usage_chunk` for the final usage chunk)."""
    delta: dict[str, Any] = {"role": "assistant"} if first else {}
    delta["content"] = out.delta
    body = _openai_head("chat.completion.chunk", request_id, created, model, system_fingerprint)
    body["choices"] = [{
        "index": index,
        "delta": delta,
        "logprobs": _chat_logprobs(tokenizer, _new_logprobs(out), opts),
        "finish_reason": _openai_finish_reason(out.finish_reason) if out.finished else None,
    }]
    body["usage"] = None
    return body


def usage_chunk(
    obj: str,
    model: str,
    created: int,
    request_id: str,
    prompt_tokens: int,
    completion_tokens: int,
    *,
    system_fingerprint: str | None = None,
) -> dict[str, Any]:
    """The stream's last chunk when include_usage is set: ``choices: []`` and the usage.
    `obj` is the stream's object name (``chat.completion.chunk`` or ``text_completion``)."""
    body = _openai_head(obj, request_id, created, model, system_fingerprint)
    body["choices"] = []
    body["usage"] = usage(prompt_tokens, completion_tokens)
    return body


# ============================================================================ OpenAI completions


def _completion_logprobs(
    tokenizer: Tokenizer,
    out: RequestOutput,
    top_n: int,
    *,
    gen: Sequence[TokenLogprob] | None,
    gen_ids: Sequence[int],
    echo_prompt: bool,
    offset: int,
) -> dict[str, Any]:
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []

    def add(token_id: int, lp: TokenLogprob | None, first_prompt: bool) -> None:
        nonlocal offset
        text = tokenizer.id_to_token(token_id)
        tokens.append(text)
        text_offset.append(offset)
        offset += len(text)
        if first_prompt or lp is None:
            token_logprobs.append(None)
            top_logprobs.append(None)
            return
        token_logprobs.append(_lp(lp.logprob))
        top: dict[str, float] = {}
        for t, v in lp.top[:top_n]:
            top.setdefault(tokenizer.id_to_token(t), _lp(v))
        top_logprobs.append(top)

    if echo_prompt:
        plps = out.prompt_logprobs or []
        for i, t in enumerate(out.prompt_token_ids):
            add(t, plps[i] if i < len(plps) else None, i == 0)
    lps = gen or []
    for i, t in enumerate(gen_ids):
        add(t, lps[i] if i < len(lps) else None, False)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": text_offset}


def completion(
    outs: Sequence[RequestOutput],
    model: str,
    created: int,
    request_id: str,
    tokenizer: Tokenizer,
    opts: CompletionOptions,
    prompt_tokens: int,
    *,
    prompt_texts: Sequence[str] | None = None,
    system_fingerprint: str | None = None,
) -> dict[str, Any]:
    """A ``text_completion`` with choice i = outs[i] (prompt-major: prompt p's j-th choice is
    at p * n + j). With `echo`, each text starts with its prompt: ``prompt_texts[i]`` when
    given (the string the client sent), else the decoded prompt ids. `prompt_tokens` is the
    usage count (the sum over prompts, each counted once)."""
    body = _openai_head("text_completion", request_id, created, model, system_fingerprint)
    choices = []
    for i, o in enumerate(outs):
        prefix = ""
        if opts.echo:
            prefix = prompt_texts[i] if prompt_texts is not None else tokenizer.decode(
                o.prompt_token_ids, skip_special_tokens=False)
        choices.append({
            "index": i,
            "text": prefix + o.text,
            "logprobs": None if opts.logprobs is None else _completion_logprobs(
                tokenizer, o, opts.logprobs, gen=o.logprobs, gen_ids=o.token_ids,
                echo_prompt=opts.echo, offset=0),
            "finish_reason": _openai_finish_reason(o.finish_reason),
        })
    body["choices"] = choices
    body["usage"] = usage(prompt_tokens, sum(len(o.token_ids) for o in outs))
    return body


def completion_chunk(
    out: RequestOutput,
    model: str,
    created: int,
    request_id: str,
    tokenizer: Tokenizer,
    opts: CompletionOptions,
    *,
    index: int = 0,
    prefix: str = "",
    text_offset: int = 0,
    system_fingerprint: str | None = None,
) -> dict[str, Any]:
    """One streamed ``text_completion`` chunk for this update of choice `index`.

    `prefix` is prepended to the delta (pass the prompt text on the first chunk for `echo`;
    the echoed prompt tokens' logprobs are included then too); `text_offset` is the number of
    characters already streamed for this choice (for the logprobs' text_offset)."""
    logprobs = None
    if opts.logprobs is not None:
        logprobs = _completion_logprobs(
            tokenizer, out, opts.logprobs, gen=_new_logprobs(out), gen_ids=out.new_token_ids,
            echo_prompt=opts.echo and bool(prefix), offset=text_offset)
    body = _openai_head("text_completion", request_id, created, model, system_fingerprint)
    body["choices"] = [{
        "index": index,
        "text": prefix + out.delta,
        "logprobs": logprobs,
        "finish_reason": _openai_finish_reason(out.finish_reason) if out.finished else None,
    }]
    body["usage"] = None
    return body


# ============================================================================ models, errors


def model_list(
    model_ids: str | Sequence[str], *, created: int = 0, owned_by: str | None = None
) -> dict[str, Any]:
    """``GET /v1/models``: TGI's shape (`owned_by` defaults to the model id)."""
    ids = [model_ids] if isinstance(model_ids, str) else list(model_ids)
    return {
        "object": "list",
        "data": [{"id": m, "object": "model", "created": created, "owned_by": owned_by or m}
                 for m in ids],
    }


def error_body(status: int, message: str, error_type: str, openai: bool) -> dict[str, Any]:
    """The error body: TGI's ``{"error": message, "error_type": type}``, or on /v1 routes
    (`openai`) ``{"error": {"message", "type", "param": null, "code": status},
    "error_type": type}``, which both the openai client and TGI-aware tools read."""
    if not openai:
        return {"error": message, "error_type": error_type}
    return {
        "error": {"message": message, "type": error_type, "param": None, "code": status},
        "error_type": error_type,
    }


def request_error_body(err: RequestError, openai: bool) -> dict[str, Any]:
    return error_body(err.status, err.message, err.error_type, openai)


def stream_error_body(status: int, message: str, error_type: str, openai: bool) -> dict[str, Any]:
    """An error sent as an SSE event after the stream started (HTTP status already 200).
    TGI routes: TGI's body; /v1 routes: the OpenAI envelope plus TGI's `http_status_code`."""
    body = error_body(status, message, error_type, openai)
    if openai:
        body["error"]["http_status_code"] = status
    return body
