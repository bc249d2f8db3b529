"""Pure-ASGI middleware: the request body size limit (TGI's --payload-limit).

The limit holds whatever the client claims: a Content-Length over the limit is refused before
reading, and a chunked body (or one whose Content-Length lies) is refused as soon as the bytes
actually received pass the limit. Within the limit, the body is buffered and replayed to the
app, so handlers never see a partial body.
"""

from __future__ import annotations

import hmac
from typing import Any

import orjson

Scope = dict[str, Any]
Message = dict[str, Any]


class BodyLimitMiddleware:
    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                if int(declared) > self.limit:
                    await _too_large(send, self.limit)
                    return
            except ValueError:
                await _reply(send, 400, {"error": "invalid Content-Length",
                                         "error_type": "validation"})
                return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.limit:
                await _too_large(send, self.limit)
                return
            chunks.append(body)
            more = message.get("more_body", False)
        payload = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": payload, "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as usual

        await self.app(scope, replay, send)


async def _too_large(send: Any, limit: int) -> None:
    await _reply(send, 413, {"error": f"request body is larger than the {limit}-byte limit",
                             "error_type": "payload_too_large"})


async def _reply(send: Any, status: int, body: dict[str, str]) -> None:
    data = orjson.dumps(body)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": data})


class AuthMiddleware:
    """`--api-key`: every route needs `Authorization: Bearer KEY`, except the exact paths in
    `open_paths`. The path is the ASGI scope's own (never a URL rebuilt from the Host header,
    the bypass of CVE-2026-48746) and the key is compared in constant time."""

    def __init__(self, app: Any, api_key: str, open_paths: frozenset[str]) -> None:
        self.app = app
        self.key = api_key.encode()
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if (scope["type"] != "http" or scope["path"] in self.open_paths
                or scope["method"] == "OPTIONS"):  # CORS preflights carry no credentials
            await self.app(scope, receive, send)
            return
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        ok = scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)
        if not ok:
            await _reply(send, 401, {"error": "missing or invalid API key (expected "
                                              "`Authorization: Bearer <key>`)",
                                     "error_type": "unauthorized"})
            return
        await self.app(scope, receive, send)
