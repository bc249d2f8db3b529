"""MPAsyncLLM against a real engine process (the default model), started once for the module.

The in-process reference results are computed first and that model is freed before the engine
process starts: two copies of the model computing side by side on a small machine make the
timings erratic.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import os
import time
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import msgspec
import pytest
from ipc_helpers import IPC_CONFIG, ipc_config

from tokenmill.frontend.async_llm import EngineDeadError
from tokenmill.frontend.llm_engine import ModelInfo
from tokenmill.frontend.mp_client import MPAsyncLLM
from tokenmill.frontend.outputs import RequestOutput
from tokenmill.ipc import EngineStats
from tokenmill.llm import LLM
from tokenmill.protocol import FinishReason, SamplingParams

pytestmark = pytest.mark.slow

T = TypeVar("T")
PROMPTS = ["Once upon a time", "The capital of France is", "def fibonacci(n):",
           "My favourite colour is"]
GREEDY = SamplingParams(max_new_tokens=24, temperature=0.0)


class Reference:
    def __init__(self) -> None:
        llm = LLM(**IPC_CONFIG)
        self.info: ModelInfo = llm.engine.info
        self.greedy: list[RequestOutput] = llm.generate(PROMPTS, GREEDY)
        del llm
        gc.collect()


@pytest.fixture(scope="module")
def ref() -> Reference:
    return Reference()


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


@pytest.fixture(scope="module")
def mp(loop: asyncio.AbstractEventLoop, ref: Reference) -> Iterator[MPAsyncLLM]:
    engine = loop.run_until_complete(MPAsyncLLM.start(ipc_config(), startup_timeout=120))
    yield engine
    loop.run_until_complete(engine.shutdown())


def run(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
    return loop.run_until_complete(asyncio.wait_for(coro, timeout))


async def collect(engine: Any, prompt: str | list[int], params: SamplingParams,
                  ) -> tuple[list[str], Any]:
    deltas, last = [], None
    async for out in engine.generate(prompt, params):
        deltas.append(out.delta)
        last = out
    return deltas, last


async def wait_idle(engine: Any, within: float = 2.0) -> EngineStats:
    deadline = time.monotonic() + within
    while True:
        stats: EngineStats = await engine.ping(5)
        idle = (stats.num_running == 0 and stats.num_waiting == 0
                and stats.num_free_kv_blocks == stats.num_kv_blocks)
        if idle or time.monotonic() > deadline:
            return stats
        await asyncio.sleep(0.02)


def test_info_and_ping(mp: MPAsyncLLM, loop: asyncio.AbstractEventLoop, ref: Reference) -> None:
    assert mp.is_alive
    # Same model info on both paths, EOS ids included; only the pid differs.
    assert mp.info == dataclasses.replace(ref.info, pid=mp.pid) and mp.info.eos_token_ids
    assert mp.engine_info.pid == mp.pid != os.getpid() == ref.info.pid
    stats = run(loop, mp.ping(5))
    assert stats.num_kv_blocks == mp.info.num_kv_blocks == stats.num_free_kv_blocks
    assert mp.stats == stats


def test_greedy_matches_in_process_engine_concurrently(
        mp: MPAsyncLLM, loop: asyncio.AbstractEventLoop, ref: Reference) -> None:
    async def main() -> list[tuple[list[str], Any]]:
        return await asyncio.gather(*(collect(mp, p, GREEDY) for p in PROMPTS))

    results = run(loop, main())
    for (deltas, last), exp in zip(results, ref.greedy):
        assert last.finished and last.finish_reason == exp.finish_reason
        assert last.token_ids == exp.token_ids
        assert last.text == exp.text and "".join(deltas) == last.text
    assert mp.stats.num_steps > 0 and mp.stats.prefix_queries > 0
    stats = run(loop, wait_idle(mp))
    assert stats.num_running == 0 and stats.num_free_kv_blocks == stats.num_kv_blocks


def test_stop_string_finishes_and_aborts_in_engine(
        mp: MPAsyncLLM, loop: asyncio.AbstractEventLoop, ref: Reference) -> None:
    full = ref.greedy[0].text
    words = full.split()
    stop = words[len(words) // 2]
    sp = SamplingParams(max_new_tokens=200, temperature=0.0, ignore_eos=True, stop=[stop])
    deltas, last = run(loop, collect(mp, PROMPTS[0], sp))
    assert last.finish_reason == FinishReason.STOP and last.stop_reason == stop
    assert last.text == full[:full.index(stop)] and "".join(deltas) == last.text
    stats = run(loop, wait_idle(mp))  # the engine stopped generating for it
    assert stats.num_running == 0 and stats.num_free_kv_blocks == stats.num_kv_blocks


def test_abandoned_stream_is_aborted(mp: MPAsyncLLM, loop: asyncio.AbstractEventLoop) -> None:
    async def main() -> EngineStats:
        gen = mp.generate("Tell me a long story", SamplingParams(max_new_tokens=2000,
                                                                 ignore_eos=True))
        n = 0
        async for _ in gen:
            n += 1
            if n == 3:
                break
        await gen.aclose()
        # The engine pushes fresh stats after the abort by itself (no ping needed).
        deadline = time.monotonic() + 2
        while mp.stats.num_running and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert mp.stats.num_running == 0
        assert mp.stats.num_free_kv_blocks == mp.stats.num_kv_blocks
        return await wait_idle(mp, 2.0)

    stats = run(loop, main())
    assert stats.num_running == 0 and stats.num_waiting == 0
    assert stats.num_free_kv_blocks == stats.num_kv_blocks
    assert not mp.processor.tracked


def test_cancelled_consumer_aborts(mp: MPAsyncLLM, loop: asyncio.AbstractEventLoop) -> None:
    async def consume() -> None:
        async for _ in mp.generate("Tell me a long story",
                                   SamplingParams(max_new_tokens=2000, ignore_eos=True)):
            pass

    async def main() -> EngineStats:
        task = asyncio.create_task(consume())
        await asyncio.sleep(0.5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await wait_idle(mp, 2.0)

    stats = run(loop, main())
    assert stats.num_running == 0 and stats.num_free_kv_blocks == stats.num_kv_blocks


def test_explicit_abort_ends_the_stream(mp: MPAsyncLLM, loop: asyncio.AbstractEventLoop) -> None:
    async def main() -> Any:
        last = None
        async for out in mp.generate("Tell me a long story", SamplingParams(
                max_new_tokens=2000, ignore_eos=True), request_id="to-abort"):
            last = out
            if len(out.token_ids) >= 2 and not out.finished:
                mp.abort("to-abort")
        return last

    last = run(loop, main())
    assert last.finished and last.finish_reason == FinishReason.ABORT
    assert run(loop, wait_idle(mp)).num_running == 0


def test_bad_input_raises_before_sending(mp: MPAsyncLLM, loop: asyncio.AbstractEventLoop,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[Any] = []
    real_send = mp._ch.send
    monkeypatch.setattr(mp._ch, "send", lambda msg: (sent.append(msg), real_send(msg)))

    async def drain(prompt: Any, sp: SamplingParams | None = None) -> None:
        async for _ in mp.generate(prompt, sp):
            pass

    too_long = [1] * mp.info.max_model_len
    with pytest.raises(ValueError, match="at most"):
        run(loop, drain(too_long))
    with pytest.raises(ValueError, match="top_p"):
        run(loop, drain("hi", SamplingParams(top_p=2.0)))
    with pytest.raises(ValueError, match="token ids"):
        run(loop, drain([1, 10**9]))
    assert sent == [] and not mp.processor.tracked and mp.is_alive


def test_engine_side_rejection_fails_only_that_request(
        mp: MPAsyncLLM, loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch) -> None:
    # Loosen the API-side check so the engine's own check rejects the prompt (RequestFailed).
    limit = mp.info.max_model_len
    monkeypatch.setattr(mp.info, "max_model_len", limit + 100)
    with pytest.raises(ValueError, match="this engine takes at most"):
        run(loop, collect(mp, [1] * limit, GREEDY))
    monkeypatch.setattr(mp.info, "max_model_len", limit)
    assert mp.is_alive and not mp.processor.tracked
    _, last = run(loop, collect(mp, PROMPTS[1], GREEDY))
    assert last.finished


def test_garbage_messages_do_not_kill_the_engine(
        mp: MPAsyncLLM, loop: asyncio.AbstractEventLoop) -> None:
    for junk in (b"", b"\xc1\xc1", b"not msgpack at all",
                 msgspec.msgpack.encode(["add", {"request_id": 5}]),
                 msgspec.msgpack.encode(["self-destruct"]), msgspec.msgpack.encode(3.5)):
        mp._send_raw(junk)
    stats = run(loop, mp.ping(5))
    assert mp.is_alive and stats.num_running == 0
    _, last = run(loop, collect(mp, PROMPTS[1], GREEDY))
    assert last.finished and last.text


def test_shutdown_exits_zero(mp: MPAsyncLLM, loop: asyncio.AbstractEventLoop) -> None:
    called: list[int] = []
    mp.on_dead = lambda: called.append(1)
    t0 = time.monotonic()
    run(loop, mp.shutdown(10))
    assert time.monotonic() - t0 < 5
    assert mp.returncode == 0 and not mp.is_alive and called == []  # not a death

    async def after() -> None:
        async for _ in mp.generate("hi"):
            pass

    with pytest.raises(EngineDeadError):
        run(loop, after())
    run(loop, mp.shutdown())  # idempotent
