"""The asynchronous engine API the HTTP server uses: submit, iterate outputs as they come, abort.

The engine loop runs on one background thread; callers on the asyncio loop talk to it through
a thread-safe command queue, and outputs come back with `call_soon_threadsafe`. Validation and
tokenization run in the caller, so a bad request fails fast and never reaches the engine.

`MPAsyncLLM` (`frontend/mp_client.py`) offers the same interface (`engine_protocol.AsyncEngine`)
with the engine in a separate process.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import queue
import threading
from collections.abc import AsyncIterator, Generator
from typing import Any

from tokenmill.config import EngineConfig
from tokenmill.frontend.engine_protocol import OnDead
from tokenmill.frontend.llm_engine import LLMEngine, ModelInfo, check_adapter_change
from tokenmill.frontend.outputs import RequestOutput
from tokenmill.ipc import EngineStats, collect_stats
from tokenmill.protocol import EngineRequest, SamplingParams

logger = logging.getLogger("tokenmill.async")


class EngineDeadError(RuntimeError):
    pass


class _Done:
    """An already-finished awaitable: `shutdown()` works both called and awaited."""

    def __await__(self) -> Generator[Any, None, None]:
        return
        yield


def _resolve(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():
        if isinstance(value, BaseException):
            fut.set_exception(value)
        else:
            fut.set_result(value)


class AsyncLLM:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[Any]]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self.on_dead: OnDead | None = None
        self._thread = threading.Thread(target=self._loop, name="tokenmill-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncLLM:
        return cls(LLMEngine.from_config(config))

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    @property
    def info(self) -> ModelInfo:
        return self.engine.info

    @property
    def stats(self) -> EngineStats:
        return collect_stats(self.engine.core)

    async def ping(self, timeout: float = 5.0) -> EngineStats:
        """A round trip through the engine thread's loop; raises TimeoutError if it is stuck."""
        if not self.is_alive:
            raise EngineDeadError("the engine is not running")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[EngineStats] = loop.create_future()
        self._commands.put(("ping", (loop, fut)))
        return await asyncio.wait_for(fut, timeout)

    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       request_id: str | None = None, adapter_id: str | None = None,
                       ) -> AsyncIterator[RequestOutput]:
        if not self.is_alive:
            raise EngineDeadError("the engine is not running")
        er = self.engine.prepare(prompt, params, request_id, adapter_id)
        rid = er.request_id
        q: asyncio.Queue[Any] = asyncio.Queue()
        with self._lock:
            if rid in self._streams:
                raise ValueError(f"duplicate request id {rid!r}")
            self._streams[rid] = (asyncio.get_running_loop(), q)
        self._commands.put(("add", er))
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            with self._lock:
                self._streams.pop(rid, None)
            if not finished:  # the consumer went away (client disconnect, cancellation)
                self._commands.put(("abort", rid))

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    async def load_adapter(self, name: str, path: str) -> None:
        """Load a LoRA adapter while the engine runs; raises ValueError when it cannot."""
        check_adapter_change(self.info, name, load=True)
        await self._adapter_command("load_adapter", name, path)
        if name not in self.info.adapters:
            self.info.adapters.append(name)

    async def unload_adapter(self, name: str) -> None:
        """New requests for `name` are refused at once; returns when its running ones are
        done and it is gone. Raises LookupError when it is not loaded."""
        check_adapter_change(self.info, name, load=False)
        self.info.adapters.remove(name)
        await self._adapter_command("unload_adapter", name, None)

    async def _adapter_command(self, cmd: str, name: str, path: str | None) -> None:
        if not self.is_alive:
            raise EngineDeadError("the engine is not running")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[str | None] = loop.create_future()

        def reply(error: str | None) -> None:  # on the engine thread
            loop.call_soon_threadsafe(_resolve, fut, error)

        self._commands.put((cmd, (name, path, reply)))
        error = await fut
        if error is not None:
            raise ValueError(error)

    def shutdown(self, timeout: float = 5.0) -> _Done:
        """Stop the engine thread (blocks up to `timeout`); the result may be awaited."""
        self._stop.set()
        self._commands.put(("noop", None))
        self._thread.join(timeout)
        return _Done()

    # ---- engine thread ---------------------------------------------------------------------
    def _deliver(self, rid: str, item: Any) -> None:
        with self._lock:
            target = self._streams.get(rid)
        if target is not None:
            loop, q = target
            loop.call_soon_threadsafe(q.put_nowait, item)

    def _handle(self, cmd: str, arg: Any) -> None:
        if cmd == "add":
            er: EngineRequest = arg
            try:
                self.engine.add_prepared(er)
            except ValueError as e:
                self._deliver(er.request_id, e)
        elif cmd == "abort":
            out = self.engine.abort(arg)
            if out is not None:  # an explicit abort() ends the stream (ABORT)
                self._deliver(arg, copy.copy(out))
        elif cmd == "ping":
            loop, fut = arg
            loop.call_soon_threadsafe(_resolve, fut, collect_stats(self.engine.core))
        elif cmd == "load_adapter":
            self.engine.core.load_adapter(*arg)
        elif cmd == "unload_adapter":
            name, _, reply = arg
            self.engine.core.unload_adapter(name, reply)

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                block = not self.engine.has_unfinished
                try:
                    cmd, arg = self._commands.get(block=block, timeout=0.1 if block else None)
                    self._handle(cmd, arg)
                    while True:  # drain whatever else arrived
                        cmd, arg = self._commands.get_nowait()
                        self._handle(cmd, arg)
                except queue.Empty:
                    pass
                self.engine.core.poll_adapters()
                if self.engine.has_unfinished:
                    for out in self.engine.step():
                        self._deliver(out.request_id, copy.copy(out))
        except BaseException as e:  # a dead engine must fail every waiter, not hang them
            logger.exception("engine loop died")
            self.error = e
            with self._lock:
                streams = list(self._streams)
            for rid in streams:
                self._deliver(rid, EngineDeadError(f"engine failed: {e}"))
            if self.on_dead is not None:
                try:
                    self.on_dead()
                except Exception:
                    logger.exception("on_dead callback failed")
