"""The FastAPI application: middleware, errors, and the service routes (health, info, metrics,
tokenize). Generation routes live in routes_tgi.py and routes_openai.py."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from starlette.middleware.cors import CORSMiddleware

from tokenmill import __version__
from tokenmill.server import routes_openai, routes_tgi, schemas
from tokenmill.server.middleware import AuthMiddleware, BodyLimitMiddleware
from tokenmill.server.responses import request_error_body
from tokenmill.server.state import ServerState, parse_body
from tokenmill.server.validation import RequestError, chat_request_to_prompt

logger = logging.getLogger("tokenmill.server")

OPEN_PATHS = frozenset({"/health", "/metrics"})
# Documented in /openapi.json: the routes read their bodies themselves (strict JSON).
REQUEST_MODELS = (schemas.GenerateRequest, schemas.CompatGenerateRequest,
                  schemas.ChatCompletionRequest, schemas.CompletionRequest)


def body_doc(model: type) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None
                  ) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json",
                    headers=headers)


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="tokenmill", version=__version__,
                  description="TGI- and OpenAI-compatible LLM inference server")
    app.state.tm = state
    cfg = state.config
    if cfg.cors_allow_origin:
        app.add_middleware(CORSMiddleware, allow_origins=cfg.cors_allow_origin,
                           allow_methods=["GET", "POST"], allow_headers=["*"])
    if cfg.api_key:
        app.add_middleware(AuthMiddleware, api_key=cfg.api_key, open_paths=OPEN_PATHS)
    app.add_middleware(BodyLimitMiddleware, limit=cfg.payload_limit)  # outermost

    @app.exception_handler(RequestError)
    async def on_request_error(request: Request, err: RequestError) -> Response:
        if state.metrics is not None and err.status in (422, 424, 429):
            state.metrics.failure(err.failure_label)
        openai = request.url.path.startswith("/v1")
        return json_response(request_error_body(err, openai), err.status)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, err: RequestValidationError) -> Response:
        # Never echo the input back: it may hold NaN, which JSON cannot carry.
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return json_response({"error": f"Input validation error: {where}: {first.get('msg')}",
                              "error_type": "validation"}, 422)

    def custom_openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version,
                               description=app.description, routes=app.routes)
            comps = spec.setdefault("components", {}).setdefault("schemas", {})
            for model in REQUEST_MODELS:
                js = model.model_json_schema(ref_template="#/components/schemas/{model}")
                for name, sub in js.pop("$defs", {}).items():
                    comps.setdefault(name, sub)
                comps[model.__name__] = js
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = custom_openapi  # type: ignore[method-assign]

    @app.get("/health", tags=["service"])
    async def health() -> Response:
        """200 once the engine answers through its loop; 503 while loading, draining or dead."""
        unhealthy = json_response({"error": "unhealthy", "error_type": "healthcheck"}, 503)
        if not state.ready:
            return unhealthy
        try:
            await state.engine.ping(timeout=10.0)
        except Exception:
            return unhealthy
        return Response(status_code=200)

    @app.get("/info", tags=["service"])
    async def info() -> Response:
        engine, limits, _ = state.require_ready()
        i = engine.info
        return json_response({
            "model_id": i.model_id, "model_sha": None, "model_pipeline_tag": "text-generation",
            "model_dtype": i.dtype, "model_device_type": str(i.device).split(":")[0],
            "max_concurrent_requests": cfg.max_concurrent_requests,
            "max_best_of": limits.max_best_of, "max_stop_sequences": limits.max_stop_sequences,
            "max_input_tokens": limits.max_input_tokens,
            "max_total_tokens": limits.max_total_tokens, "validation_workers": 1,
            "max_client_batch_size": limits.max_client_batch_size,
            "router": "tokenmill", "version": __version__, "sha": None, "docker_label": None,
            "engine_pid": getattr(i, "pid", None),
        })

    @app.get("/metrics", tags=["service"])
    async def metrics() -> Response:
        if state.metrics is None:
            return Response(b"", media_type="text/plain; version=0.0.4")
        if state.engine is not None:
            try:  # fresh figures: after an abort an idle engine sends nothing by itself
                stats = await state.engine.ping(timeout=2.0)
            except Exception:
                stats = state.engine.stats
            if stats is not None:
                state.metrics.engine_stats(stats, state.engine.info.block_size)
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/tokenize", tags=["tgi"], openapi_extra=body_doc(schemas.GenerateRequest))
    async def tokenize(request: Request) -> Response:
        from tokenmill.server.responses import simple_tokens

        engine, _, _ = state.require_ready()
        body = await parse_body(request, schemas.GenerateRequest)
        return json_response(simple_tokens(engine.tokenizer, body.inputs))

    @app.post("/chat_tokenize", tags=["tgi"],
              openapi_extra=body_doc(schemas.ChatCompletionRequest))
    async def chat_tokenize(request: Request) -> Response:
        from tokenmill.server.responses import simple_tokens

        engine, _, _ = state.require_ready()
        body = await parse_body(request, schemas.ChatCompletionRequest)
        prompt = await asyncio.to_thread(chat_request_to_prompt, engine.tokenizer, body)
        return json_response({"tokenize_response": simple_tokens(
            engine.tokenizer, prompt, add_special_tokens=False), "templated_text": prompt})

    routes_tgi.register(app, state)
    routes_openai.register(app, state)
    return app
