"""Server-wide state shared by the routes: the engine (once loaded), limits, metrics, the
concurrency gate, and helpers to run one or several generations for a request."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from tokenmill.config import ServerConfig
from tokenmill.frontend.outputs import RequestOutput
from tokenmill.protocol import SamplingParams
from tokenmill.server.errors import OverloadedError, RequestError
from tokenmill.server.logs import log_request
from tokenmill.server.metrics import Metrics
from tokenmill.server.validation import Limits

logger = logging.getLogger("tokenmill.server")
T = TypeVar("T")


def overloaded() -> RequestError:
    return OverloadedError()


class ServerState:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.engine: Any = None
        self.limits: Limits | None = None
        self.metrics: Metrics | None = None
        self.draining = False
        self.fatal: str | None = None
        self.exit_code = 0
        self.in_flight = 0
        self.adapter_loads: dict[str, asyncio.Task[None]] = {}  # LoRA loads in progress

    def attach(self, engine: Any) -> None:
        c = self.config
        self.limits = Limits.from_model(
            engine.info.max_model_len, max_input_tokens=c.max_input_tokens,
            max_total_tokens=c.max_total_tokens,
            max_concurrent_requests=c.max_concurrent_requests, max_best_of=c.max_best_of,
            max_stop_sequences=c.max_stop_sequences, max_top_n_tokens=c.max_top_n_tokens,
            max_client_batch_size=c.max_client_batch_size, vocab_size=engine.info.vocab_size)
        self.metrics = Metrics(self.limits.max_input_tokens, self.limits.max_total_tokens)
        self.engine = engine

    async def close(self) -> None:
        engine, self.engine = self.engine, None
        if engine is None:
            return
        result = engine.shutdown()
        if asyncio.iscoroutine(result):
            await result

    @property
    def ready(self) -> bool:
        return (self.engine is not None and self.engine.is_alive and not self.draining
                and self.fatal is None)

    def require_ready(self) -> tuple[Any, Limits, Metrics]:
        if not self.ready or self.limits is None or self.metrics is None:
            why = ("the server is shutting down" if self.draining else
                   self.fatal or "the model is still loading")
            raise RequestError(503, "unavailable", why)
        return self.engine, self.limits, self.metrics

    def acquire(self) -> None:
        """TGI's semaphore: past max_concurrent_requests, a request gets 429 at once."""
        if self.in_flight >= self.config.max_concurrent_requests:
            raise overloaded()
        self.in_flight += 1
        if self.metrics:
            self.metrics.in_flight.set(self.in_flight)

    def release(self) -> None:
        self.in_flight -= 1
        if self.metrics:
            self.metrics.in_flight.set(self.in_flight)

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        self.acquire()
        try:
            yield
        finally:
            self.release()


async def parse_body(request: Request, model: type[BaseModel]) -> Any:
    """Strict JSON: orjson rejects NaN/Infinity, invalid UTF-8, lone surrogates and
    pathological nesting; the pydantic model then checks the shape (422)."""
    ctype = request.headers.get("content-type", "")
    if ctype and "json" not in ctype.split(";")[0].lower():
        raise RequestError(415, "validation", "expected a JSON body (content-type: "
                           "application/json)")
    raw = await request.body()
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise RequestError(400, "validation", f"malformed JSON: {e}") from e
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise RequestError(422, "validation",
                           f"Input validation error: {where}: {first.get('msg')}") from e


@dataclass
class Timing:
    start: float = field(default_factory=time.perf_counter)
    validated: float = 0.0
    first_token: float = 0.0
    end: float = 0.0

    def mark_token(self) -> None:
        now = time.perf_counter()
        if not self.first_token:
            self.first_token = now
        self.end = now

    @property
    def queue(self) -> float:
        return max(0.0, (self.first_token or self.end) - (self.validated or self.start))

    @property
    def inference(self) -> float:
        return max(0.0, self.end - (self.first_token or self.end))


def new_request_id() -> str:
    return uuid.uuid4().hex


def seeded(params: SamplingParams, i: int) -> SamplingParams:
    """The i-th of n parallel samples: distinct seeds, reproducible when a seed was given."""
    if params.seed is None or i == 0:
        return params
    import msgspec

    return msgspec.structs.replace(params, seed=(params.seed + i) % 2**64)


async def stream_many(engine: Any, prompt_ids: list[int], params: list[SamplingParams],
                      adapter_id: str | None, timing: Timing,
                      ) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Run len(params) generations of one prompt concurrently; yield (index, update) as they
    come. Leaving early (client gone) closes every generation, which aborts it."""
    if len(params) == 1:
        async with contextlib.aclosing(engine.generate(prompt_ids, params[0],
                                                       adapter_id=adapter_id)) as gen:
            async for out in gen:
                timing.mark_token()
                yield 0, out
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, sp: SamplingParams) -> None:
        try:
            async with contextlib.aclosing(engine.generate(prompt_ids, sp,
                                                           adapter_id=adapter_id)) as gen:
                async for out in gen:
                    await queue.put((i, out))
            await queue.put((i, None))
        except BaseException as e:
            await queue.put((i, e))

    tasks = [asyncio.create_task(pump(i, sp)) for i, sp in enumerate(params)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                timing.mark_token()
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


LONG_TEXT = 8192  # characters: work on a longer text runs on a worker thread


async def off_loop(chars: int, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)`: inline for a text of `chars` characters up to LONG_TEXT, else on a
    worker thread, so other requests go on meanwhile (the tokenizer's batch calls release the
    GIL while they run; its single-text `encode` holds it: a 2 MB body once kept the event loop
    for ~2 s, stalling every other request and /health)."""
    if chars <= LONG_TEXT:
        return fn(*args, **kwargs)
    return await asyncio.to_thread(fn, *args, **kwargs)


async def encode_text(tokenizer: Any, text: str, add_special_tokens: bool = True) -> list[int]:
    """`tokenizer.encode(text)` through `encode_batch` (as fast for one short text), off the
    event loop when the text is long."""
    return list((await off_loop(len(text), tokenizer.encode_batch, [text],
                                add_special_tokens))[0])


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the request's body is already read: what the ASGI
    server sends next is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result; cancelled if the client goes away first (its generations are then
    aborted and its concurrency slot freed, as a stream's are), which ends the request with
    a 499 no one reads. Streams watch for the disconnect themselves (StreamingResponse)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            logger.info("client disconnected from %s: its generation was aborted",
                        request.url.path)
            raise RequestError(499, "client_closed_request", "client closed the request")
        return task.result()
    finally:
        watch.cancel()
        if not task.done():  # this handler itself was cancelled
            task.cancel()


async def collect(engine: Any, prompt_ids: list[int], params: list[SamplingParams],
                  adapter_id: str | None, timing: Timing) -> list[RequestOutput]:
    final: list[RequestOutput | None] = [None] * len(params)
    async for i, out in stream_many(engine, prompt_ids, params, adapter_id, timing):
        if out.finished:
            final[i] = out
    assert all(o is not None for o in final)
    return final  # type: ignore[return-value]


def record(state: ServerState, timing: Timing, request_id: str, route: str,
           input_tokens: int, outs: list[RequestOutput], max_new_tokens: int) -> None:
    metrics = state.metrics
    generated = sum(len(o.token_ids) for o in outs)
    if metrics is not None:
        metrics.request_done(validation=max(0.0, timing.validated - timing.start),
                             queue=timing.queue, inference=timing.inference,
                             total=time.perf_counter() - timing.start,
                             input_tokens=input_tokens, generated=generated,
                             max_new_tokens=max_new_tokens)
    reason = outs[0].finish_reason.value if outs and outs[0].finish_reason else None
    log_request(logger, id=request_id, route=route, input_tokens=input_tokens,
                generated_tokens=generated, queue_time=timing.queue,
                time_per_token=timing.inference / max(1, generated - 1),
                total_time=time.perf_counter() - timing.start, finish_reason=reason)
