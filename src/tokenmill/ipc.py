"""The wire protocol between the API process and the engine process (no pickle anywhere).

Two one-way ZeroMQ channels over `ipc://` sockets in a private 0700 temp dir; the API
process binds both, the engine process connects both:

    API  PUSH ──(input:  ToEngine messages)──►  PULL  engine
    API  PULL ◄─(output: FromEngine messages)──  PUSH  engine

Every message is one frame: a msgspec msgpack encoding of a tagged union. Each message
struct is `array_like`, so a frame is `[tag, field, ...]`; the payload types it carries
(`EngineRequest`, `EngineOutput`) are the msgspec structs of `tokenmill.protocol`.

To the engine:   AddRequest | AbortRequests | Ping | Shutdown | LoadAdapter | UnloadAdapter
From the engine: Ready | Outputs | Pong | RequestFailed | Fatal | AdapterDone

The engine sends `Ready` once after the model is loaded (or `Fatal` and exits 1), then
`Outputs` after every step that produced any (and, with an empty list, after a turn that
took adds or aborts, so the stats stay current), a `Pong` for each `Ping` (answered between
steps, so a Pong proves the loop is alive), `RequestFailed` when `add_request` rejects one
request, `AdapterDone` when a LoRA load or unload has finished (a load reads the files on a
worker thread, so the batch goes on; an unload waits for the adapter's requests to finish),
and `Fatal` before it exits on a crash. A frame that does not decode is logged and
dropped by either side.

This module imports msgspec only (no torch, no zmq), so both sides and tests can use it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec

from tokenmill.protocol import EngineOutput, EngineRequest

if TYPE_CHECKING:
    from tokenmill.engine.core import EngineCore
    from tokenmill.engine.outputs import RunnerOutput, SchedulerOutput

__all__ = [
    "AbortRequests",
    "AdapterDone",
    "AddRequest",
    "BatchRecorder",
    "EngineInfo",
    "EngineStats",
    "Fatal",
    "FromEngine",
    "FromEngineDecoder",
    "FromEngineEncoder",
    "LoadAdapter",
    "Outputs",
    "Ping",
    "Pong",
    "Ready",
    "RequestFailed",
    "Shutdown",
    "ToEngine",
    "ToEngineDecoder",
    "ToEngineEncoder",
    "UnloadAdapter",
    "collect_stats",
]


class EngineInfo(msgspec.Struct, kw_only=True):
    """What the engine reports once it is ready (the API side adds EOS ids and the tokenizer)."""

    model_id: str
    max_model_len: int
    vocab_size: int
    dtype: str
    device: str
    num_kv_blocks: int
    block_size: int
    attention_backend: str
    pid: int
    adapters: list[str] = msgspec.field(default_factory=list)  # LoRA adapters loaded


class EngineStats(msgspec.Struct, kw_only=True, array_like=True):
    """A snapshot of the engine's load, sent with every `Outputs` and `Pong`."""

    num_running: int = 0
    num_waiting: int = 0
    num_kv_blocks: int = 0
    num_free_kv_blocks: int = 0
    prefix_queries: int = 0  # prompt tokens looked up in the prefix cache (cumulative)
    prefix_hits: int = 0  # prompt tokens served from it (cumulative)
    num_preemptions: int = 0  # cumulative
    num_steps: int = 0  # cumulative forward passes
    last_batch_tokens: int = 0  # tokens in the most recent forward pass
    last_batch_size: int = 0  # sequences in the most recent forward pass


# ---- API process → engine -------------------------------------------------------------------


class AddRequest(msgspec.Struct, tag="add", array_like=True):
    request: EngineRequest


class AbortRequests(msgspec.Struct, tag="abort", array_like=True):
    request_ids: list[str]


class Ping(msgspec.Struct, tag="ping", array_like=True):
    nonce: int


class Shutdown(msgspec.Struct, tag="shutdown", array_like=True):
    pass


class LoadAdapter(msgspec.Struct, tag="load_adapter", array_like=True):
    nonce: int
    name: str
    path: str  # already resolved and checked against the allowed roots by the API side


class UnloadAdapter(msgspec.Struct, tag="unload_adapter", array_like=True):
    nonce: int
    name: str


ToEngine = AddRequest | AbortRequests | Ping | Shutdown | LoadAdapter | UnloadAdapter


# ---- engine → API process -------------------------------------------------------------------


class Ready(msgspec.Struct, tag="ready", array_like=True):
    info: EngineInfo


class Outputs(msgspec.Struct, tag="outputs", array_like=True):
    outputs: list[EngineOutput]
    stats: EngineStats


class Pong(msgspec.Struct, tag="pong", array_like=True):
    nonce: int
    stats: EngineStats


class RequestFailed(msgspec.Struct, tag="failed", array_like=True):
    """`add_request` raised ValueError in the engine: only this request fails."""

    request_id: str
    message: str


class Fatal(msgspec.Struct, tag="fatal", array_like=True):
    """The engine cannot go on (model load failure, crash in the loop) and exits non-zero.

    `load_error` is true when the model could not be loaded (a `ModelLoadError`): the
    message then names the offending file and is fit to show a user as is.
    """

    message: str
    load_error: bool = False


class AdapterDone(msgspec.Struct, tag="adapter_done", array_like=True):
    """The LoRA load / unload with this nonce is over: `error` is None, or why it failed."""

    nonce: int
    error: str | None = None


FromEngine = Ready | Outputs | Pong | RequestFailed | Fatal | AdapterDone


# ---- codecs: one encoder/decoder pair per direction ------------------------------------------


class ToEngineEncoder:
    def __init__(self) -> None:
        self._enc = msgspec.msgpack.Encoder()

    def encode(self, msg: ToEngine) -> bytes:
        return self._enc.encode(msg)


class ToEngineDecoder:
    def __init__(self) -> None:
        self._dec = msgspec.msgpack.Decoder(ToEngine)

    def decode(self, data: bytes | bytearray | memoryview) -> ToEngine:
        """Raises `msgspec.DecodeError` (incl. `ValidationError`) for a malformed frame."""
        return self._dec.decode(data)


class FromEngineEncoder:
    def __init__(self) -> None:
        self._enc = msgspec.msgpack.Encoder()

    def encode(self, msg: FromEngine) -> bytes:
        return self._enc.encode(msg)


class FromEngineDecoder:
    def __init__(self) -> None:
        self._dec = msgspec.msgpack.Decoder(FromEngine)

    def decode(self, data: bytes | bytearray | memoryview) -> FromEngine:
        """Raises `msgspec.DecodeError` (incl. `ValidationError`) for a malformed frame."""
        return self._dec.decode(data)


# ---- stats ----------------------------------------------------------------------------------


class BatchRecorder:
    """Wraps a runner to remember the size of the last forward pass (for `EngineStats`)."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.last_batch_tokens = 0
        self.last_batch_size = 0

    def execute(self, so: SchedulerOutput) -> RunnerOutput:
        self.last_batch_tokens = so.num_tokens
        self.last_batch_size = len(so.chunks)
        result: RunnerOutput = self.runner.execute(so)
        return result

    def __getattr__(self, name: str) -> Any:  # num_blocks, block_size, ... of the real runner
        if name == "runner":
            raise AttributeError(name)
        return getattr(self.runner, name)


def collect_stats(core: EngineCore) -> EngineStats:
    sched = core.scheduler
    kv = sched.kv
    runner = core.runner
    return EngineStats(
        num_running=len(sched.running), num_waiting=len(sched.waiting),
        num_kv_blocks=kv.num_blocks, num_free_kv_blocks=kv.num_free_blocks,
        prefix_queries=kv.prefix_queries, prefix_hits=kv.prefix_hits,
        num_preemptions=sched.num_preemptions, num_steps=core.num_steps,
        last_batch_tokens=getattr(runner, "last_batch_tokens", 0),
        last_batch_size=getattr(runner, "last_batch_size", 0))
