"""TGI's native generation routes: /generate, /generate_stream, / (compat), /invocations."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from tokenmill.frontend.async_llm import EngineDeadError
from tokenmill.frontend.outputs import RequestOutput
from tokenmill.server import schemas
from tokenmill.server.errors import GenerationError, InputValidationError, RequestError
from tokenmill.server.responses import (
    generate_response,
    pick_best_of,
    stream_error_body,
    stream_event,
)
from tokenmill.server.routes_lora import ensure_adapter
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
from tokenmill.server.validation import GenerateOptions, choice_params, validate_generate

SSE_HEADERS = {"X-Accel-Buffering": "no", "Cache-Control": "no-cache"}


def sse(event: Any) -> bytes:
    return b"data: " + orjson.dumps(event) + b"\n\n"


def engine_failure(e: Exception) -> RequestError:
    """Errors from the engine call: bad input found there is 422, the rest is 424."""
    if isinstance(e, ValueError):
        return InputValidationError(str(e))
    return GenerationError(str(e) or type(e).__name__)


async def _prepare(state: ServerState, body: schemas.GenerateRequest, stream: bool,
                   default_full_text: bool
                   ) -> tuple[Any, list[int], Any, GenerateOptions, Timing]:
    engine, limits, metrics = state.require_ready()
    metrics.inc("tgi_request_count")
    timing = Timing()
    ids = await encode_text(engine.tokenizer, body.inputs)
    ids, params, opts = validate_generate(body, ids, limits, stream=stream,
                                          default_return_full_text=default_full_text,
                                          adapters=engine.info.adapters)
    if opts.best_of > 1 and params.logprobs is None:  # best_of ranks by mean logprob
        params = msgspec.structs.replace(params, logprobs=0)
    timing.validated = time.perf_counter()
    return engine, ids, params, opts, timing


async def generate_json(state: ServerState, body: schemas.GenerateRequest,
                        default_full_text: bool = False) -> tuple[dict[str, Any], dict[str, str]]:
    engine, ids, params, opts, timing = await _prepare(state, body, False, default_full_text)
    rid = new_request_id()
    with state.slot():
        plist = [choice_params(params, i) for i in range(opts.best_of)]
        try:
            outs = await collect(engine, ids, plist, opts.adapter_id, timing)
        except (EngineDeadError, ValueError, RuntimeError) as e:
            raise engine_failure(e) from e
    best, others = pick_best_of(outs) if len(outs) > 1 else (outs[0], None)
    record(state, timing, rid, "/generate", len(ids), outs, params.max_new_tokens)
    generated = len(best.token_ids)
    total = time.perf_counter() - timing.start
    headers = {
        "x-compute-type": str(engine.info.device).split(":")[0],
        "x-compute-time": f"{total:.6f}",
        "x-compute-characters": str(len(body.inputs)),
        "x-total-time": str(int(total * 1000)),
        "x-validation-time": str(int((timing.validated - timing.start) * 1000)),
        "x-queue-time": str(int(timing.queue * 1000)),
        "x-inference-time": str(int(timing.inference * 1000)),
        "x-time-per-token": str(int(timing.inference * 1000 / max(1, generated - 1))),
        "x-prompt-tokens": str(len(ids)),
        "x-generated-tokens": str(generated),
    }
    return generate_response(best, engine.tokenizer, opts, body.inputs, ids, others), headers


async def generate_sse(state: ServerState, body: schemas.GenerateRequest,
                       default_full_text: bool = False) -> StreamingResponse:
    engine, ids, params, opts, timing = await _prepare(state, body, True, default_full_text)
    state.acquire()  # held until the stream ends, however it ends
    rid = new_request_id()

    async def events() -> AsyncIterator[bytes]:
        final: RequestOutput | None = None
        sent = 0
        try:
            async for _, out in stream_many(engine, ids, [params], opts.adapter_id, timing):
                for ev in stream_event(out, engine.tokenizer, opts, sent, body.inputs, len(ids)):
                    yield sse(ev)
                sent += len(out.new_token_ids)
                if out.finished:
                    final = out
            if final is not None:
                record(state, timing, rid, "/generate_stream", len(ids), [final],
                       params.max_new_tokens)
        except (EngineDeadError, ValueError, RuntimeError) as e:
            err = engine_failure(e)
            if state.metrics:
                state.metrics.failure("generation")
            yield sse(stream_error_body(err.status, err.message, err.error_type, openai=False))
        finally:
            state.release()

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={**SSE_HEADERS, "x-compute-type":
                                      str(engine.info.device).split(":")[0]})


def _adapter_id(body: schemas.GenerateRequest) -> str | None:
    return body.parameters.adapter_id if body.parameters is not None else None


def register(app: FastAPI, state: ServerState) -> None:
    from tokenmill.server.app import body_doc, json_response

    @app.post("/generate", tags=["tgi"], openapi_extra=body_doc(schemas.GenerateRequest),
              response_model=schemas.GenerateResponse)
    async def generate(request: Request) -> Response:
        body = await parse_body(request, schemas.GenerateRequest)
        await ensure_adapter(state, _adapter_id(body))
        result, headers = await unless_disconnected(request, generate_json(state, body))
        return json_response(result, headers=headers)

    @app.post("/generate_stream", tags=["tgi"],
              openapi_extra=body_doc(schemas.GenerateRequest))
    async def generate_stream(request: Request) -> Response:
        body = await parse_body(request, schemas.GenerateRequest)
        await ensure_adapter(state, _adapter_id(body))
        return await generate_sse(state, body)

    @app.post("/", tags=["tgi"], openapi_extra=body_doc(schemas.CompatGenerateRequest))
    async def compat_generate(request: Request) -> Response:
        body = await parse_body(request, schemas.CompatGenerateRequest)
        return await _compat(request, body)

    async def _compat(request: Request, body: Any) -> Response:
        req = schemas.GenerateRequest(inputs=body.inputs, parameters=body.parameters)
        await ensure_adapter(state, _adapter_id(req))
        if body.stream:
            return await generate_sse(state, req, default_full_text=True)
        result, headers = await unless_disconnected(
            request, generate_json(state, req, default_full_text=True))
        return json_response([result], headers=headers)

    @app.post("/invocations", tags=["tgi"])
    async def invocations(request: Request) -> Response:
        """SageMaker: the body is tried as TGI generate, then chat, then completions."""
        from tokenmill.server import routes_openai
        from tokenmill.server.errors import RequestError

        raw = await request.body()
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise RequestError(400, "validation", f"malformed JSON: {e}") from e
        if isinstance(data, dict) and "inputs" in data:
            body = await parse_body(request, schemas.CompatGenerateRequest)
            return await _compat(request, body)
        if isinstance(data, dict) and "messages" in data:
            return await routes_openai.chat_completions(state, request)
        if isinstance(data, dict) and "prompt" in data:
            return await routes_openai.completions(state, request)
        raise InputValidationError("the body must hold `inputs`, `messages` or `prompt`")
