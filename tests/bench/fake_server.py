"""A fake streaming server (aiohttp) with the OpenAI and TGI stream shapes, on a thread."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

from aiohttp import web

DELAY = 0.002  # seconds between streamed tokens


def _data(obj: Any, crlf: bool = False) -> bytes:
    end = "\r\n" if crlf else "\n"
    return f"data: {json.dumps(obj)}{end}{end}".encode()


class FakeServer:
    """Streams `max_tokens` tokens per request. The prompt picks a behaviour:
    `FAIL422` → a 422 JSON error, `MIDERR` → an error event after two tokens, `HTTP500` → a
    500 with a plain-text body, `NOUSAGE` → no usage / details (the bench counts chunks)."""

    def __init__(self, model: str = "fake-model", delay: float = DELAY) -> None:
        self.model, self.delay = model, delay
        self.bodies: list[dict[str, Any]] = []
        self.auth: list[str | None] = []  # Authorization headers received
        self.in_flight = self.max_in_flight = 0
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> FakeServer:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        app = web.Application()
        app.router.add_post("/v1/completions", self._openai)
        app.router.add_post("/v1/chat/completions", self._openai)
        app.router.add_post("/generate_stream", self._tgi)
        app.router.add_get("/v1/models",
                           lambda r: web.json_response({"data": [{"id": self.model}]}))
        app.router.add_get("/info", lambda r: web.json_response({"model_id": self.model}))
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()

    async def _begin(self, request: web.Request) -> tuple[dict[str, Any], str]:
        body = await request.json()
        self.bodies.append(body)
        self.auth.append(request.headers.get("Authorization"))
        prompt = body.get("prompt") or body.get("inputs") or body["messages"][-1]["content"]
        return body, prompt

    async def _openai(self, request: web.Request) -> web.StreamResponse:
        body, prompt = await self._begin(request)
        chat = request.path.endswith("chat/completions")
        if "FAIL422" in prompt:
            return web.json_response({"error": {"message": "prompt too long",
                                                "type": "invalid_request_error"}}, status=422)
        if "HTTP500" in prompt:
            return web.Response(status=500, text="internal oops")
        n = body["max_tokens"]
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        self._enter()
        try:
            if chat:
                await resp.write(_data({"choices": [{"index": 0, "delta": {"role": "assistant"},
                                                     "finish_reason": None}]}))
            await resp.write(b": keep-alive\n\n")
            for i in range(n):
                await asyncio.sleep(self.delay)
                if "MIDERR" in prompt and i == 2:
                    await resp.write(_data({"error": {"message": "engine died", "type": "x"}}))
                    break
                text = f" w{i}"
                choice = ({"index": 0, "delta": {"content": text}, "finish_reason": None} if chat
                          else {"index": 0, "text": text, "finish_reason": None})
                await resp.write(_data({"choices": [choice], "usage": None}))
            else:
                last = ({"index": 0, "delta": {}, "finish_reason": "length"} if chat
                        else {"index": 0, "text": "", "finish_reason": "length"})
                await resp.write(_data({"choices": [last]}))
                usage = (body.get("stream_options") or {}).get("include_usage")
                if usage and "NOUSAGE" not in prompt:
                    await resp.write(_data({"choices": [], "usage": {
                        "prompt_tokens": len(prompt.split()), "completion_tokens": n,
                        "total_tokens": n + len(prompt.split())}}))
            await resp.write(b"data: [DONE]\n\n")
        finally:
            self.in_flight -= 1
        return resp

    async def _tgi(self, request: web.Request) -> web.StreamResponse:
        body, prompt = await self._begin(request)
        if "FAIL422" in prompt:
            return web.json_response({"error": "Input validation error: too long",
                                      "error_type": "validation"}, status=422)
        params = body["parameters"]
        n = params["max_new_tokens"]
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        self._enter()
        try:
            for i in range(n):
                await asyncio.sleep(self.delay)
                if "MIDERR" in prompt and i == 2:
                    await resp.write(_data({"error": "Request failed during generation",
                                            "error_type": "generation"}, crlf=True))
                    break
                last = i == n - 1
                ev = {"index": i + 1, "token": {"id": i, "text": f" w{i}", "logprob": -1.0,
                                                "special": False},
                      "generated_text": "done" if last else None, "details": None}
                if last and params.get("details") and "NOUSAGE" not in prompt:
                    ev["details"] = {"finish_reason": "length", "generated_tokens": n,
                                     "seed": None, "input_length": len(prompt.split())}
                # Split one event across two writes to exercise the parser's buffering.
                raw = _data(ev, crlf=True)
                await resp.write(raw[:7])
                await resp.write(raw[7:])
        finally:
            self.in_flight -= 1
        return resp

    def _enter(self) -> None:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
