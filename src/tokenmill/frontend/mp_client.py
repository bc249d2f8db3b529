"""`MPAsyncLLM`: the API-process side of the engine process (same interface as `AsyncLLM`).

This process keeps the tokenizer, request validation, detokenization / stop strings and the
per-request streams; scheduling and the model run in `python -m tokenmill.engine.proc`,
reached over two ZeroMQ `ipc://` sockets in a private 0700 temp dir (protocol: `ipc.py`):

    MPAsyncLLM  PUSH (bind  <tmp>/input)  ── AddRequest/AbortRequests/Ping/Shutdown ──►  engine PULL
    MPAsyncLLM  PULL (bind  <tmp>/output) ◄── Ready/Outputs/Pong/RequestFailed/Fatal ──  engine PUSH

One asyncio task receives engine messages and fans them out to per-request queues; a
watchdog task polls the child every 0.2 s. When the engine dies (or sends `Fatal`) every
open stream raises `EngineDeadError`, `is_alive` turns False and `on_dead` is called once.

An instance belongs to the event loop `start()` ran on.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import itertools
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import zmq
import zmq.asyncio

from tokenmill.config import EngineConfig
from tokenmill.engine.proc import IPC_DIR_PREFIX
from tokenmill.frontend.async_llm import EngineDeadError
from tokenmill.frontend.engine_protocol import OnDead
from tokenmill.frontend.llm_engine import (
    InputPreparer,
    ModelInfo,
    check_adapter_change,
    eos_token_ids,
    load_tokenizer,
)
from tokenmill.frontend.outputs import RequestOutput
from tokenmill.frontend.processor import OutputProcessor
from tokenmill.ipc import (
    AbortRequests,
    AdapterDone,
    AddRequest,
    EngineInfo,
    EngineStats,
    Fatal,
    FromEngine,
    FromEngineDecoder,
    LoadAdapter,
    Outputs,
    Ping,
    Pong,
    Ready,
    RequestFailed,
    Shutdown,
    ToEngine,
    ToEngineEncoder,
    UnloadAdapter,
)
from tokenmill.loader import ModelLoadError
from tokenmill.protocol import SamplingParams
from tokenmill.tokenizer import Tokenizer

__all__ = ["EngineDeadError", "EngineLoadError", "EngineStartError", "MPAsyncLLM"]

logger = logging.getLogger("tokenmill.mp_client")

WATCHDOG_INTERVAL_S = 0.2


class EngineStartError(RuntimeError):
    """The engine process did not become ready (crashed, exited or timed out)."""


class EngineLoadError(ModelLoadError, EngineStartError):
    """The engine process could not load the model; the message names the file."""


def _load_frontend(config: EngineConfig) -> tuple[Tokenizer, list[int]]:
    """Resolve the model in this process and load what the API side needs from it."""
    from tokenmill.loader import resolve_model

    source = resolve_model(config.model.model_id, revision=config.model.revision,
                           token=os.environ.get("HF_TOKEN"))
    tokenizer = load_tokenizer(source)
    return tokenizer, eos_token_ids(source.generation_config(), source.config(), tokenizer)


def _child_env(engine_cpus: set[int] | None = None) -> dict[str, str]:
    """The child must import this very tokenmill, installed or not; `engine_cpus`: the cores
    it should run on (`engine/proc.split_cores`), passed as `TOKENMILL_ENGINE_CPUS`."""
    from tokenmill.engine.proc import ENGINE_CPUS_ENV

    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    if engine_cpus:
        env[ENGINE_CPUS_ENV] = ",".join(map(str, sorted(engine_cpus)))
    return env


class _Channel:
    """The two sockets, the temp dir holding them, and the codecs."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix=IPC_DIR_PREFIX)  # mode 0700
        self.input_addr = f"ipc://{self.dir}/input"
        self.output_addr = f"ipc://{self.dir}/output"
        self.ctx = zmq.Context(io_threads=1)
        self.actx = zmq.asyncio.Context.shadow(self.ctx)
        # Sends are synchronous and never block (unbounded queue), so an abort can be sent
        # from a `finally` of an async generator.
        self.to_engine = self.ctx.socket(zmq.PUSH)
        self.to_engine.setsockopt(zmq.SNDHWM, 0)
        self.to_engine.setsockopt(zmq.LINGER, 0)
        self.from_engine = self.actx.socket(zmq.PULL)
        self.from_engine.setsockopt(zmq.RCVHWM, 0)
        self.from_engine.setsockopt(zmq.LINGER, 0)
        try:
            self.to_engine.bind(self.input_addr)
            self.from_engine.bind(self.output_addr)
        except BaseException:
            self.close()
            raise
        self.encoder = ToEngineEncoder()
        self.decoder = FromEngineDecoder()

    def send(self, msg: ToEngine) -> None:
        self.send_bytes(self.encoder.encode(msg))

    def send_bytes(self, data: bytes) -> None:
        try:
            self.to_engine.send(data, zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as e:  # no engine connected (it died), or the socket is closed
            raise EngineDeadError(f"cannot reach the engine: {e}") from e

    async def recv(self, timeout_s: float | None = None) -> FromEngine | None:
        """The next message that decodes; None when nothing arrives within `timeout_s`."""
        while True:
            if timeout_s is not None and not await self.from_engine.poll(int(timeout_s * 1000)):
                return None
            frame = await self.from_engine.recv()
            try:
                return self.decoder.decode(frame)
            except msgspec.DecodeError as e:
                logger.error("dropping a malformed engine message (%d bytes): %s", len(frame), e)

    def close(self) -> None:
        self.to_engine.close(linger=0)
        self.from_engine.close(linger=0)
        self.ctx.term()
        shutil.rmtree(self.dir, ignore_errors=True)


def _reap(proc: subprocess.Popen[bytes], grace_s: float = 2.0) -> None:
    """Make sure the child is gone (SIGTERM, then SIGKILL)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class MPAsyncLLM:
    """Use `await MPAsyncLLM.start(config)`; the constructor is internal."""

    def __init__(self, config: EngineConfig, proc: subprocess.Popen[bytes], channel: _Channel,
                 tokenizer: Tokenizer, info: ModelInfo, engine_info: EngineInfo) -> None:
        self.config = config
        self._proc = proc
        self._ch = channel
        self._tokenizer = tokenizer
        self._info = info
        self.engine_info = engine_info
        self.inputs = InputPreparer(tokenizer, info)
        self.processor = OutputProcessor(tokenizer)
        self.on_dead: OnDead | None = None
        self._streams: dict[str, asyncio.Queue[Any]] = {}
        self._pings: dict[int, asyncio.Future[EngineStats]] = {}
        self._adapter_ops: dict[int, asyncio.Future[str | None]] = {}
        self._nonces = itertools.count(1)
        self._stats = EngineStats(num_kv_blocks=info.num_kv_blocks,
                                  num_free_kv_blocks=info.num_kv_blocks)
        self._dead: EngineDeadError | None = None
        self._closing = False
        self._closed = False
        self._tasks = [asyncio.create_task(self._output_loop(), name="tokenmill-engine-output"),
                       asyncio.create_task(self._watchdog(), name="tokenmill-engine-watchdog")]

    # ---- start-up ---------------------------------------------------------------------------
    @classmethod
    async def start(cls, config: EngineConfig, *, startup_timeout: float = 600.0,
                    engine_cpus: set[int] | None = None) -> MPAsyncLLM:
        """Launch the engine process (on `engine_cpus` when given), load the tokenizer here
        meanwhile, wait for `Ready`.

        Raises `EngineLoadError` (a `ModelLoadError`) when the engine cannot load the model,
        `EngineStartError` when it exits or stays silent past `startup_timeout`; the child
        is gone when either is raised.
        """
        ch = _Channel()
        cmd = [sys.executable, "-m", "tokenmill.engine.proc",
               "--config-json", msgspec.json.encode(config).decode(),
               "--input", ch.input_addr, "--output", ch.output_addr]
        log_level = logging.getLevelName(logging.getLogger("tokenmill").getEffectiveLevel())
        cmd += ["--log-level", log_level if isinstance(log_level, str) else "WARNING"]
        try:
            # Its own session: a terminal's Ctrl-C reaches only this process, which then shuts
            # the engine down in order; the engine exits by itself if this process dies.
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, env=_child_env(engine_cpus),
                                    start_new_session=True)
        except BaseException:
            ch.close()
            raise
        frontend = asyncio.ensure_future(asyncio.to_thread(_load_frontend, config))
        try:
            engine_info = await cls._wait_ready(proc, ch, startup_timeout)
            tokenizer, eos = await frontend
        except BaseException:
            frontend.add_done_callback(lambda f: f.cancelled() or f.exception())
            await asyncio.to_thread(_reap, proc)
            ch.close()
            raise
        info = ModelInfo.from_engine_info(engine_info, eos)
        logger.info("engine process %d ready: %s on %s", proc.pid, info.model_id, info.device)
        return cls(config, proc, ch, tokenizer, info, engine_info)

    @staticmethod
    async def _wait_ready(proc: subprocess.Popen[bytes], ch: _Channel,
                          timeout: float) -> EngineInfo:
        deadline = time.monotonic() + timeout
        exited_at: float | None = None
        while True:
            msg = await ch.recv(0.1)
            if isinstance(msg, Ready):
                return msg.info
            if isinstance(msg, Fatal):
                err = EngineLoadError if msg.load_error else EngineStartError
                raise err(msg.message)
            now = time.monotonic()
            rc = proc.poll()
            if rc is not None:
                # A Fatal sent just before exiting may still be in flight: wait a little.
                exited_at = exited_at or now
                if now - exited_at > 1.0:
                    raise EngineStartError(
                        f"the engine process exited with code {rc} before it was ready")
            elif now > deadline:
                raise EngineStartError(f"the engine process was not ready within {timeout:g} s")

    # ---- the AsyncEngine interface ----------------------------------------------------------
    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def stats(self) -> EngineStats:
        """The latest stats the engine sent (with each step's outputs and each pong)."""
        return self._stats

    @property
    def is_alive(self) -> bool:
        return self._dead is None and not self._closing and self._proc.poll() is None

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.poll()

    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       request_id: str | None = None, adapter_id: str | None = None,
                       ) -> AsyncIterator[RequestOutput]:
        if not self.is_alive:
            raise self._dead_error()
        er = self.inputs.prepare(prompt, params, request_id, adapter_id)  # ValueError: not sent
        rid = er.request_id
        if rid in self._streams:
            raise ValueError(f"duplicate request id {rid!r}")
        q: asyncio.Queue[Any] = asyncio.Queue()
        self._streams[rid] = q
        self.processor.add(rid, er.prompt_token_ids, er.params)
        finished = False
        try:
            self._ch.send(AddRequest(er))
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    finished = True  # nothing left to abort: the engine is gone or refused it
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self._streams.pop(rid, None)
            if not finished:  # the consumer went away (client disconnect, cancellation)
                self.processor.remove(rid)
                self._send_quietly(AbortRequests([rid]))

    def abort(self, request_id: str) -> None:
        """Abort a request; its stream (if any) ends with a FinishReason.ABORT output."""
        out = self.processor.abort(request_id)
        q = self._streams.get(request_id)
        if out is not None and q is not None:
            q.put_nowait(copy.copy(out))
        self._send_quietly(AbortRequests([request_id]))

    async def load_adapter(self, name: str, path: str) -> None:
        """Load a LoRA adapter while the engine runs; raises ValueError when it cannot."""
        check_adapter_change(self._info, name, load=True)
        await self._adapter_op(lambda nonce: LoadAdapter(nonce, name, path))
        if name not in self._info.adapters:
            self._info.adapters.append(name)

    async def unload_adapter(self, name: str) -> None:
        """New requests for `name` are refused at once; returns when its running ones are
        done and it is gone. Raises LookupError when it is not loaded."""
        check_adapter_change(self._info, name, load=False)
        self._info.adapters.remove(name)
        await self._adapter_op(lambda nonce: UnloadAdapter(nonce, name))

    async def _adapter_op(self, make: Callable[[int], ToEngine]) -> None:
        if not self.is_alive:
            raise self._dead_error()
        nonce = next(self._nonces)
        fut: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._adapter_ops[nonce] = fut
        try:
            self._ch.send(make(nonce))
            error = await fut
        finally:
            self._adapter_ops.pop(nonce, None)
        if error is not None:
            raise ValueError(error)

    async def ping(self, timeout: float = 5.0) -> EngineStats:
        if not self.is_alive:
            raise self._dead_error()
        nonce = next(self._nonces)
        fut: asyncio.Future[EngineStats] = asyncio.get_running_loop().create_future()
        self._pings[nonce] = fut
        try:
            self._ch.send(Ping(nonce))
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._pings.pop(nonce, None)

    async def shutdown(self, timeout: float = 5.0) -> None:
        """Ask the engine to exit (SIGTERM, then SIGKILL, if it takes longer than `timeout`)."""
        if self._closed:
            return
        self._closed = self._closing = True
        self._send_quietly(Shutdown())
        deadline = time.monotonic() + timeout
        while self._proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self._proc.poll() is None:
            logger.warning("engine process %d did not exit in %g s; terminating it",
                           self._proc.pid, timeout)
            await asyncio.to_thread(_reap, self._proc)
        self._mark_dead("the engine was shut down")
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._ch.close()

    # ---- internals --------------------------------------------------------------------------
    def _dead_error(self) -> EngineDeadError:
        if self._dead is not None:
            return EngineDeadError(str(self._dead))
        return EngineDeadError("the engine is not running")

    def _send_quietly(self, msg: ToEngine) -> None:
        if self._dead is None:
            with contextlib.suppress(EngineDeadError):
                self._ch.send(msg)

    def _send_raw(self, data: bytes) -> None:
        """Tests only: put arbitrary bytes on the wire to the engine."""
        self._ch.send_bytes(data)

    def _mark_dead(self, reason: str) -> None:
        if self._dead is not None:
            return
        self._dead = EngineDeadError(reason)
        if not self._closing:
            logger.error("engine died: %s", reason)
        for q in self._streams.values():
            q.put_nowait(EngineDeadError(reason))
        futures: list[asyncio.Future[Any]] = [*self._pings.values(), *self._adapter_ops.values()]
        for fut in futures:
            if not fut.done():
                fut.set_exception(EngineDeadError(reason))
        self.processor.tracked.clear()
        if not self._closing and self.on_dead is not None:
            try:
                self.on_dead()
            except Exception:
                logger.exception("on_dead callback failed")

    def _dispatch(self, msg: FromEngine) -> None:
        if isinstance(msg, Outputs):
            self._stats = msg.stats
            aborts: list[str] = []
            for eo in msg.outputs:
                out, abort = self.processor.process(eo)
                if abort:  # a stop string matched: the engine would generate on otherwise
                    aborts.append(eo.request_id)
                if out is not None:
                    q = self._streams.get(eo.request_id)
                    if q is not None:
                        q.put_nowait(copy.copy(out))
            if aborts:
                self._send_quietly(AbortRequests(aborts))
        elif isinstance(msg, Pong):
            self._stats = msg.stats
            fut = self._pings.get(msg.nonce)
            if fut is not None and not fut.done():
                fut.set_result(msg.stats)
        elif isinstance(msg, RequestFailed):
            self.processor.remove(msg.request_id)
            q = self._streams.get(msg.request_id)
            if q is not None:
                q.put_nowait(ValueError(msg.message))
        elif isinstance(msg, AdapterDone):
            op = self._adapter_ops.get(msg.nonce)
            if op is not None and not op.done():
                op.set_result(msg.error)
        elif isinstance(msg, Fatal):
            self._mark_dead(f"engine failed: {msg.message}")
        # Ready: only expected once, before this task started

    async def _output_loop(self) -> None:
        try:
            while True:
                msg = await self._ch.recv()
                if msg is not None:
                    self._dispatch(msg)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug here must not leave streams hanging
            logger.exception("engine output handler failed")
            self._mark_dead(f"engine output handler failed: {type(e).__name__}: {e}")
            self._proc.kill()

    async def _watchdog(self) -> None:
        while True:
            rc = self._proc.poll()
            if rc is not None:
                self._mark_dead(f"the engine process exited with code {rc}")
                return
            await asyncio.sleep(WATCHDOG_INTERVAL_S)


if TYPE_CHECKING:  # mypy checks that both engines implement the one interface
    from tokenmill.frontend.async_llm import AsyncLLM
    from tokenmill.frontend.engine_protocol import AsyncEngine

    def _implements(a: AsyncLLM, m: MPAsyncLLM) -> tuple[AsyncEngine, AsyncEngine]:
        return a, m
