"""Service routes: /health, /info, /metrics, /tokenize, /chat_tokenize."""

from __future__ import annotations

import asyncio

from fastapi import FastAPI, Request
from fastapi.responses import Response

from tokenmill import __version__
from tokenmill.server import schemas
from tokenmill.server.responses import simple_tokens
from tokenmill.server.state import ServerState, off_loop, parse_body
from tokenmill.server.validation import chat_request_to_prompt


def register(app: FastAPI, state: ServerState) -> None:
    from tokenmill.server.app import body_doc, json_response

    cfg = state.config

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
            "engine_pid": getattr(i, "pid", None), "adapters": list(i.adapters),
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
        engine, _, _ = state.require_ready()
        body = await parse_body(request, schemas.GenerateRequest)
        return json_response(await off_loop(len(body.inputs), simple_tokens, engine.tokenizer,
                                             body.inputs))

    @app.post("/chat_tokenize", tags=["tgi"],
              openapi_extra=body_doc(schemas.ChatCompletionRequest))
    async def chat_tokenize(request: Request) -> Response:
        engine, _, _ = state.require_ready()
        body = await parse_body(request, schemas.ChatCompletionRequest)
        prompt = await asyncio.to_thread(chat_request_to_prompt, engine.tokenizer, body)
        tokens = await off_loop(len(prompt), simple_tokens, engine.tokenizer, prompt,
                                 add_special_tokens=False)
        return json_response({"tokenize_response": tokens, "templated_text": prompt})
