"""The in-thread AsyncLLM offers the same ping / stats / info / on_dead / shutdown surface."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from ipc_helpers import IPC_CONFIG

from tokenmill.frontend.async_llm import AsyncLLM
from tokenmill.llm import LLM
from tokenmill.protocol import FinishReason, SamplingParams

pytestmark = pytest.mark.slow


def test_in_thread_async_llm_surface() -> None:
    llm = LLM(**IPC_CONFIG)
    engine = AsyncLLM(llm.engine)
    try:
        async def main() -> tuple[Any, Any, Any]:
            last = None
            async for out in engine.generate("Once upon a time", SamplingParams(
                    max_new_tokens=8, temperature=0.0, ignore_eos=True)):
                last = out
            aborted = None
            async for out in engine.generate("Tell me a story", SamplingParams(
                    max_new_tokens=500, ignore_eos=True), request_id="ab"):
                aborted = out
                if not out.finished:
                    engine.abort("ab")  # an explicit abort ends the stream
            return await engine.ping(5), last, aborted

        stats, last, aborted = asyncio.run(asyncio.wait_for(main(), 60))
        assert last.finished and len(last.token_ids) == 8
        assert aborted.finished and aborted.finish_reason == FinishReason.ABORT
        assert engine.info is llm.engine.info and engine.on_dead is None
        assert stats.num_free_kv_blocks == stats.num_kv_blocks and stats.num_steps > 0
        assert stats.num_running == 0 and engine.stats.last_batch_size >= 1
    finally:
        async def stop() -> None:
            await engine.shutdown()  # awaitable, as MPAsyncLLM.shutdown

        asyncio.run(stop())
    assert not engine._thread.is_alive()
    engine.shutdown()  # and plain calls still work
