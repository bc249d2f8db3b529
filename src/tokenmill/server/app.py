"""The FastAPI application: middleware, error handlers and the OpenAPI document. The routes
live in routes_service.py (health, info, metrics, tokenize), routes_tgi.py and
routes_openai.py."""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from tokenmill import __version__
from tokenmill.server import routes_lora, routes_openai, routes_service, routes_tgi, schemas
from tokenmill.server.errors import RequestError
from tokenmill.server.middleware import AuthMiddleware, BodyLimitMiddleware
from tokenmill.server.responses import request_error_body
from tokenmill.server.state import ServerState

logger = logging.getLogger("tokenmill.server")

OPEN_PATHS = frozenset({"/health", "/metrics"})
# Documented in /openapi.json: the routes read their bodies themselves (strict JSON).
REQUEST_MODELS = (schemas.GenerateRequest, schemas.CompatGenerateRequest,
                  schemas.ChatCompletionRequest, schemas.CompletionRequest,
                  routes_lora.LoadLoraAdapterRequest, routes_lora.UnloadLoraAdapterRequest)


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

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, err: StarletteHTTPException) -> Response:
        # unknown routes (404), wrong methods (405): the error body every other error has
        kind = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
        openai = request.url.path.startswith("/v1")
        body = request_error_body(RequestError(err.status_code, kind, str(err.detail)), openai)
        return json_response(body, err.status_code, dict(err.headers or {}))

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

    routes_service.register(app, state)
    routes_tgi.register(app, state)
    routes_openai.register(app, state)
    routes_lora.register(app, state)
    return app
