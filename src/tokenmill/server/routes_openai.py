"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from tokenmill import __version__
from tokenmill.frontend.async_llm import EngineDeadError
from tokenmill.frontend.outputs import RequestOutput
from tokenmill.protocol import SamplingParams
from tokenmill.server import schemas
from tokenmill.server.errors import NotFoundError
from tokenmill.server.responses import (
    chat_chunk,
    chat_completion,
    completion,
    completion_chunk,
    model_list,
    stream_error_body,
    usage_chunk,
)
from tokenmill.server.routes_lora import ensure_adapter
from tokenmill.server.routes_tgi import SSE_HEADERS, engine_failure, sse
from tokenmill.server.state import (
    ServerState,
    Timing,
    collect,
    encode_text,
    new_request_id,
    parse_body,
    record,
    stream_many,
    unless_disconnected,
)
from tokenmill.server.tools import ToolCallStream, rewrite_completion
from tokenmill.server.validation import (
    chat_request_to_prompt,
    choice_params,
    validate_chat,
    validate_completion,
    validate_completion_prompt,
)

FINGERPRINT = f"{__version__}-native"
DONE = b"data: [DONE]\n\n"


def _check_model(state: ServerState, model: str | None) -> tuple[str, str | None]:
    """(model name to echo, adapter id). The base model answers to its id and to the
    placeholders clients send when they name none: "tgi" (TGI's alias), "dummy"
    (huggingface_hub given a URL) and ""; a loaded LoRA adapter answers to its name."""
    info = state.engine.info
    if model in (None, "", "tgi", "dummy", info.model_id):
        return info.model_id, None
    if model in info.adapters:
        return model, model
    raise NotFoundError(f"The model `{model}` does not exist.")


async def chat_completions(state: ServerState, request: Request) -> Response:
    engine, limits, metrics = state.require_ready()
    body = await parse_body(request, schemas.ChatCompletionRequest)
    metrics.inc("tgi_request_count")
    await ensure_adapter(state, body.model)
    model, adapter = _check_model(state, body.model)
    timing = Timing()
    tok = engine.tokenizer
    prompt = await asyncio.to_thread(chat_request_to_prompt, tok, body)
    ids = await encode_text(tok, prompt, add_special_tokens=False)
    params, opts = validate_chat(body, ids, limits, default_model=model)
    timing.validated = time.perf_counter()
    plist = [choice_params(params, i) for i in range(opts.n)]
    rid, created = f"chatcmpl-{new_request_id()}", int(time.time())
    if not opts.stream:
        with state.slot():
            outs = await unless_disconnected(request, _collect(engine, ids, plist, adapter,
                                                               timing))
        record(state, timing, rid, "/v1/chat/completions", len(ids), outs,
               params.max_new_tokens)
        answer = chat_completion(outs, model, created, rid, tok, opts, len(ids),
                                 system_fingerprint=FINGERPRINT)
        return _json(answer if opts.tools is None else rewrite_completion(answer, opts.tools))

    calls = None if opts.tools is None else ToolCallStream(opts.tools)

    def chunk(i: int, out: RequestOutput, first: bool) -> dict[str, Any] | list[dict[str, Any]]:
        body = chat_chunk(out, model, created, rid, tok, opts, index=i, first=first,
                          system_fingerprint=FINGERPRINT)
        return body if calls is None else calls.feed(body)

    usage_obj = "chat.completion.chunk" if opts.include_usage else None
    return _stream(state, engine, ids, plist, timing, rid, "/v1/chat/completions", chunk,
                   usage_obj, model, created, adapter)


async def completions(state: ServerState, request: Request) -> Response:
    engine, limits, metrics = state.require_ready()
    body = await parse_body(request, schemas.CompletionRequest)
    metrics.inc("tgi_request_count")
    await ensure_adapter(state, body.model)
    model, adapter = _check_model(state, body.model)
    timing = Timing()
    tok = engine.tokenizer
    prompts, params, opts = validate_completion(body, limits, default_model=model)
    encoded = [await encode_text(tok, p) if isinstance(p, str) else list(p) for p in prompts]
    per_prompt = [validate_completion_prompt(ids, params, opts, limits) for ids in encoded]
    timing.validated = time.perf_counter()
    rid, created = f"cmpl-{new_request_id()}", int(time.time())
    texts = [p if isinstance(p, str) else tok.decode(p, skip_special_tokens=False)
             for p in prompts]
    if not opts.stream:
        with state.slot():
            results = await unless_disconnected(request, asyncio.gather(*(
                _best_n(engine, ids, sp, opts.n, opts.best_of, adapter, timing)
                for ids, sp in zip(encoded, per_prompt))))
        outs = [o for group in results for o in group]
        record(state, timing, rid, "/v1/completions", sum(map(len, encoded)), outs,
               params.max_new_tokens)
        return _json(completion(outs, model, created, rid, tok, opts,
                                sum(len(ids) for ids in encoded),
                                prompt_texts=[t for t in texts for _ in range(opts.n)],
                                system_fingerprint=FINGERPRINT))
    if len(encoded) != 1:
        from tokenmill.server.errors import InputValidationError

        raise InputValidationError("streaming takes a single prompt")
    offsets = [0] * opts.n
    started = [False] * opts.n

    def chunk(i: int, out: RequestOutput, first: bool) -> dict[str, Any]:
        prefix = texts[0] if opts.echo and not started[i] else ""
        started[i] = True
        body = completion_chunk(out, model, created, rid, tok, opts, index=i, prefix=prefix,
                                text_offset=offsets[i], system_fingerprint=FINGERPRINT)
        offsets[i] += len(prefix) + len(out.delta)
        return body

    plist = [choice_params(per_prompt[0], i) for i in range(opts.n)]
    usage_obj = "text_completion" if opts.include_usage else None
    return _stream(state, engine, encoded[0], plist, timing, rid, "/v1/completions", chunk,
                   usage_obj, model, created, adapter)


async def _collect(engine: Any, ids: list[int], plist: list[SamplingParams],
                   adapter: str | None, timing: Timing) -> list[RequestOutput]:
    try:
        return await collect(engine, ids, plist, adapter, timing)
    except (EngineDeadError, ValueError, RuntimeError) as e:
        raise engine_failure(e) from e


async def _best_n(engine: Any, ids: list[int], params: SamplingParams, n: int, best_of: int,
                  adapter: str | None, timing: Timing) -> list[RequestOutput]:
    """`best_of` samples of one prompt, of which the `n` with the highest mean logprob."""
    if best_of <= n:
        return await _collect(engine, ids, [choice_params(params, i) for i in range(n)],
                              adapter, timing)
    ranked = msgspec.structs.replace(params, logprobs=params.logprobs or 0)
    outs = await _collect(engine, ids, [choice_params(ranked, i) for i in range(best_of)],
                          adapter, timing)

    def mean_logprob(o: RequestOutput) -> float:
        lps = o.logprobs or []
        return sum(lp.logprob for lp in lps) / max(1, len(lps))

    return sorted(outs, key=mean_logprob, reverse=True)[:n]


def _stream(state: ServerState, engine: Any, ids: list[int], plist: list[SamplingParams],
            timing: Timing, rid: str, route: str, chunk: Any, usage_obj: str | None,
            model: str, created: int, adapter: str | None) -> Response:
    state.acquire()  # held until the stream ends, however it ends

    async def events() -> AsyncIterator[bytes]:
        first = [True] * len(plist)
        finals: list[RequestOutput] = []
        try:
            async for i, out in stream_many(engine, ids, plist, adapter, timing):
                bodies = chunk(i, out, first[i])  # a tool stream may hold back or split one
                for body in bodies if isinstance(bodies, list) else [bodies]:
                    yield sse(body)
                first[i] = False
                if out.finished:
                    finals.append(out)
            record(state, timing, rid, route, len(ids), finals, plist[0].max_new_tokens)
            if usage_obj is not None:
                yield sse(usage_chunk(usage_obj, model, created, rid, len(ids),
                                      sum(len(o.token_ids) for o in finals),
                                      system_fingerprint=FINGERPRINT))
        except (EngineDeadError, ValueError, RuntimeError) as e:
            err = engine_failure(e)
            if state.metrics:
                state.metrics.failure("generation")
            yield sse(stream_error_body(err.status, err.message, err.error_type, openai=True))
        finally:
            state.release()
        yield DONE

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)


def _json(body: dict[str, Any]) -> Response:
    from tokenmill.server.app import json_response

    return json_response(body)


def register(app: FastAPI, state: ServerState) -> None:
    from tokenmill.server.app import body_doc, json_response

    @app.post("/v1/chat/completions", tags=["openai"],
              openapi_extra=body_doc(schemas.ChatCompletionRequest))
    async def chat(request: Request) -> Response:
        return await chat_completions(state, request)

    @app.post("/v1/completions", tags=["openai"],
              openapi_extra=body_doc(schemas.CompletionRequest))
    async def legacy_completions(request: Request) -> Response:
        return await completions(state, request)

    @app.get("/v1/models", tags=["openai"])
    async def models() -> Response:
        engine, _, _ = state.require_ready()
        return json_response(model_list([engine.info.model_id, *engine.info.adapters]))
