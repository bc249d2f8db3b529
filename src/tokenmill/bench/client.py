"""One streamed request to an OpenAI- or TGI-style server, timed token by token."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tokenmill.bench.sse import SSEParser
from tokenmill.bench.workload import RequestSpec

if TYPE_CHECKING:
    import aiohttp

APIS = ("openai-completions", "openai-chat", "tgi")
PATHS = {"openai-completions": "/v1/completions", "openai-chat": "/v1/chat/completions",
         "tgi": "/generate_stream"}


@dataclass(frozen=True, slots=True)
class ClientConfig:
    url: str  # base URL, e.g. http://127.0.0.1:3000
    api: str  # one of APIS
    model: str | None = None  # OpenAI `model` (None: "tgi", which our server and TGI accept)
    api_key: str | None = None
    ignore_eos: bool = True  # ask for exactly the output length where the server allows it
    temperature: float = 0.0  # 0 = greedy
    timeout: float = 600.0  # seconds without a byte before a request fails


@dataclass(slots=True)
class RequestRecord:
    """One request's outcome. Times are seconds; `start` is from the beginning of its level."""

    index: int
    concurrency: int
    prompt_tokens: int  # of the workload (exact with a tokenizer, else estimated)
    max_tokens: int
    warmup: bool = False
    start: float = 0.0
    ok: bool = False
    error: str | None = None
    status: int | None = None
    ttft: float | None = None  # to the first generated token
    e2e: float | None = None  # request sent → stream ended
    output_tokens: int = 0
    token_source: str = ""  # "usage" / "details" (the server's count) or "chunks" (counted here)
    server_prompt_tokens: int | None = None  # the server's count, when it reports one
    itl: list[float] = field(default_factory=list)  # gaps between token-bearing events


@dataclass(slots=True)
class Chunk:
    """What one parsed stream event says."""

    tokens: int = 0  # token-bearing events count 1 (a chunk may hold several tokens)
    final_tokens: int | None = None  # the server's total (usage / details)
    prompt_tokens: int | None = None
    error: str | None = None
    done: bool = False


def request_body(cfg: ClientConfig, spec: RequestSpec) -> dict[str, Any]:
    """The JSON body for one request of `spec` in `cfg.api`'s shape."""
    n = spec.output_tokens
    if cfg.api == "tgi":
        params: dict[str, Any] = {"max_new_tokens": n, "details": True,
                                  "decoder_input_details": False}
        if cfg.temperature > 0:
            params |= {"do_sample": True, "temperature": cfg.temperature}
        if cfg.ignore_eos:
            params["ignore_eos"] = True  # an extension; servers without it ignore the field
        return {"inputs": spec.prompt, "parameters": params, "stream": True}
    body: dict[str, Any] = {"model": cfg.model or "tgi", "max_tokens": n, "stream": True,
                            "stream_options": {"include_usage": True},
                            "temperature": cfg.temperature}
    if cfg.api == "openai-chat":
        body["messages"] = [{"role": "user", "content": spec.prompt}]
    else:
        body["prompt"] = spec.prompt
    if cfg.ignore_eos:
        body |= {"ignore_eos": True, "min_tokens": n}  # vLLM, llama.cpp, tokenmill
    return body


def parse_chunk(api: str, data: str) -> Chunk:
    """One SSE `data` payload of `api`'s stream."""
    if data.strip() == "[DONE]":
        return Chunk(done=True)
    try:
        obj = json.loads(data)
    except json.JSONDecodeError:
        return Chunk(error=f"bad JSON in stream: {data[:120]!r}")
    if not isinstance(obj, dict):
        return Chunk(error=f"unexpected stream event: {data[:120]!r}")
    if obj.get("error") is not None:
        return Chunk(error=error_message(obj))
    if api == "tgi":
        c = Chunk(tokens=1 if obj.get("token") is not None else 0)
        details = obj.get("details")
        if isinstance(details, dict):
            c.final_tokens = _int(details.get("generated_tokens"))
            c.prompt_tokens = _int(details.get("input_length"))
        return c
    c = Chunk()
    choices = obj.get("choices") or []
    if choices and isinstance(choices[0], dict):
        ch = choices[0]
        if api == "openai-chat":
            delta = ch.get("delta") or {}
            text = delta.get("content") or delta.get("reasoning_content")
        else:
            text = ch.get("text")
        c.tokens = 1 if text else 0  # role-only and finish-only chunks carry no token
    usage = obj.get("usage")
    if isinstance(usage, dict):
        c.final_tokens = _int(usage.get("completion_tokens"))
        c.prompt_tokens = _int(usage.get("prompt_tokens"))
    return c


def error_message(obj: Any) -> str:
    """The message of a TGI (`{"error": str}`), OpenAI (`{"error": {"message"}}`) or FastAPI
    (`{"detail"}`) error body."""
    if isinstance(obj, dict):
        err = obj.get("error", obj.get("detail"))
        if isinstance(err, dict):
            err = err.get("message", err)
        if err is not None:
            return str(err)[:300]
    return str(obj)[:300]


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


class StreamTimer:
    """Turns timestamped stream chunks into a RequestRecord's timings and counts."""

    def __init__(self, api: str, record: RequestRecord, t_sent: float) -> None:
        self.api, self.rec, self.t_sent = api, record, t_sent
        self.last: float | None = None
        self.chunks = 0
        self.final: int | None = None
        self.done = False

    def on_event(self, data: str, now: float) -> None:
        c = parse_chunk(self.api, data)
        if c.error is not None and self.rec.error is None:
            self.rec.error = c.error
        self.done |= c.done
        if c.final_tokens is not None:
            self.final = c.final_tokens
        if c.prompt_tokens is not None:
            self.rec.server_prompt_tokens = c.prompt_tokens
        if c.tokens:
            if self.last is None:
                self.rec.ttft = now - self.t_sent
            else:
                self.rec.itl.append(now - self.last)
            self.last = now
            self.chunks += c.tokens

    def finish(self, now: float) -> RequestRecord:
        rec = self.rec
        rec.e2e = now - self.t_sent
        if self.final is not None:
            rec.output_tokens = self.final
            rec.token_source = "details" if self.api == "tgi" else "usage"
        else:
            rec.output_tokens, rec.token_source = self.chunks, "chunks"
        if rec.error is None and self.chunks == 0:
            rec.error = "no tokens in the stream"
        rec.ok = rec.error is None
        return rec


async def send_request(session: aiohttp.ClientSession, cfg: ClientConfig, spec: RequestSpec,
                       record: RequestRecord) -> RequestRecord:
    """POST one streaming request and fill in `record` (errors are recorded, not raised)."""
    import aiohttp

    headers = {"Accept": "text/event-stream"}
    if cfg.api_key:
        headers["Authorization"] = f"Bearer {cfg.api_key}"
    t_sent = time.perf_counter()
    timer = StreamTimer(cfg.api, record, t_sent)
    try:
        async with session.post(cfg.url.rstrip("/") + PATHS[cfg.api],
                                json=request_body(cfg, spec), headers=headers) as resp:
            record.status = resp.status
            if resp.status != 200:
                text = await resp.text(errors="replace")
                try:
                    msg = error_message(json.loads(text))
                except json.JSONDecodeError:
                    msg = text[:300]
                record.error = f"HTTP {resp.status}: {msg}"
            else:
                parser = SSEParser()
                async for chunk in resp.content.iter_any():
                    now = time.perf_counter()
                    for ev in parser.feed(chunk):
                        timer.on_event(ev.data, now)
                for ev in parser.close():
                    timer.on_event(ev.data, time.perf_counter())
    except asyncio.TimeoutError:
        record.error = f"timed out (no data for {cfg.timeout:g} s)"
    except aiohttp.ClientError as e:
        record.error = f"{type(e).__name__}: {e}"
    return timer.finish(time.perf_counter())
