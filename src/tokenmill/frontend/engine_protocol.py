"""The interface the HTTP layer programs against: `AsyncLLM` (engine on a thread of this
process) and `MPAsyncLLM` (engine in a child process over ZeroMQ) both implement it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from tokenmill.frontend.llm_engine import ModelInfo
    from tokenmill.frontend.outputs import RequestOutput
    from tokenmill.ipc import EngineStats
    from tokenmill.protocol import SamplingParams

# Called once, with no arguments, when the engine dies unexpectedly (not after shutdown).
# MPAsyncLLM calls it on its event loop; AsyncLLM on its engine thread (so it must be
# thread-safe there, e.g. `loop.call_soon_threadsafe(...)`).
OnDead = Callable[[], Any]


class AsyncEngine(Protocol):
    on_dead: OnDead | None

    @property
    def tokenizer(self) -> Any: ...

    @property
    def info(self) -> ModelInfo: ...

    @property
    def is_alive(self) -> bool: ...

    @property
    def stats(self) -> EngineStats: ...

    def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                 request_id: str | None = None, adapter_id: str | None = None,
                 ) -> AsyncIterator[RequestOutput]:
        """Async generator of cumulative outputs (`delta` = new text). Raises ValueError for
        bad input before anything reaches the engine, EngineDeadError if the engine dies.
        Closing the iterator early aborts the request."""
        ...

    def abort(self, request_id: str) -> None: ...

    async def load_adapter(self, name: str, path: str) -> None:
        """Load a LoRA adapter at run time (the batch goes on); ValueError when it cannot."""
        ...

    async def unload_adapter(self, name: str) -> None:
        """Refuse new requests for `name` now, return once its requests are done and it is
        gone; LookupError when it is not loaded."""
        ...

    async def ping(self, timeout: float = 5.0) -> EngineStats:
        """A round trip through the engine loop; raises TimeoutError / EngineDeadError."""
        ...

    def shutdown(self, timeout: float = 5.0) -> Awaitable[None]:
        """Stop the engine (`await engine.shutdown()` works for both implementations)."""
        ...
