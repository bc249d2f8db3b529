"""The engine process: scheduling + model, fed over ZeroMQ by the API process.

    python -m tokenmill.engine.proc --config-json JSON --input ADDR --output ADDR

`JSON` is `msgspec.json.encode(EngineConfig)`. The API process binds both addresses; this
process connects a PULL socket to `--input` (messages `tokenmill.ipc.ToEngine`) and a PUSH
socket to `--output` (`tokenmill.ipc.FromEngine`). See `tokenmill/ipc.py` for the protocol.

Life cycle: load the model (on failure: `Fatal(load_error=True)`, exit 1) → `Ready` → busy
loop. Each turn drains every pending input message (blocking up to 100 ms when idle,
non-blocking when there is work), applies adds / aborts / pings, runs one `core.step()` and
sends its `Outputs` (also with no outputs, for fresh stats, after adds and aborts). Exit codes: 0 after `Shutdown` or SIGTERM (or SIGINT), 1 after a load
failure or a crash in the loop (a `Fatal` is sent first), 1 when the parent process goes
away (checked by a watcher thread, so no orphan engine survives a killed API process).

No tokenizer is loaded here: requests arrive tokenized with their EOS ids filled in.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING

import msgspec
import zmq

from tokenmill.config import EngineConfig
from tokenmill.ipc import (
    AbortRequests,
    AdapterDone,
    AddRequest,
    Fatal,
    FromEngine,
    FromEngineEncoder,
    LoadAdapter,
    Outputs,
    Ping,
    Pong,
    Ready,
    RequestFailed,
    Shutdown,
    ToEngineDecoder,
    UnloadAdapter,
    collect_stats,
)

if TYPE_CHECKING:
    from tokenmill.engine.core import EngineCore

logger = logging.getLogger("tokenmill.engine.proc")

IPC_DIR_PREFIX = "tokenmill-ipc-"  # the prefix of MPAsyncLLM's socket dirs
IDLE_POLL_MS = 100
PARENT_CHECK_S = 0.5


class _Terminate(Exception):
    """Raised from the SIGTERM / SIGINT handler to leave the loop cleanly (exit 0)."""


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise _Terminate(signal.Signals(signum).name)


def _socket_dir(*addrs: str) -> str | None:
    """The private dir MPAsyncLLM made for both sockets, if that is where they are."""
    dirs = {os.path.dirname(a.removeprefix("ipc://")) for a in addrs if a.startswith("ipc://")}
    if len(dirs) == 1 and len(addrs) == 2:
        d = dirs.pop()
        if os.path.basename(d).startswith(IPC_DIR_PREFIX):
            return d
    return None


def _watch_parent(parent_pid: int, socket_dir: str | None) -> None:
    """Exit at once when the parent dies (we get re-parented), even mid-load or mid-step.

    A parent killed hard cannot remove its socket dir, so the engine does it then."""
    while True:
        time.sleep(PARENT_CHECK_S)
        if os.getppid() != parent_pid:
            if socket_dir is not None:
                shutil.rmtree(socket_dir, ignore_errors=True)
            os._exit(1)


ENGINE_CPUS_ENV = "TOKENMILL_ENGINE_CPUS"  # set by the server: the cores the engine runs on


def split_cores(cores: set[int]) -> tuple[set[int], set[int]]:
    """(API process cores, engine cores). With 4 or more cores the API process (HTTP, JSON,
    tokenization, detokenization) gets cores of its own, so it never preempts a thread of the
    engine's parallel matmuls: one core per 8, at least one. With fewer both share all."""
    if len(cores) < 4:
        return set(cores), set(cores)
    ordered = sorted(cores)
    n_api = max(1, len(ordered) // 8)
    return set(ordered[-n_api:]), set(ordered[:-n_api])


def _set_threads() -> None:
    import torch

    wanted = os.environ.get(ENGINE_CPUS_ENV, "")
    if wanted:
        with contextlib.suppress(ValueError, OSError):
            os.sched_setaffinity(0, {int(c) for c in wanted.split(",")})
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    override = os.environ.get("OMP_NUM_THREADS", "")  # the usual knob, honoured if set
    torch.set_num_threads(max(1, int(override) if override.isdigit() else n))


class EngineProc:
    def __init__(self, input_addr: str, output_addr: str) -> None:
        self.ctx = zmq.Context(io_threads=1)
        self.input = self.ctx.socket(zmq.PULL)
        self.input.setsockopt(zmq.LINGER, 0)
        self.input.connect(input_addr)
        self.output = self.ctx.socket(zmq.PUSH)
        self.output.setsockopt(zmq.SNDHWM, 0)  # never block the loop on a slow reader
        self.output.setsockopt(zmq.LINGER, 2000)  # let a final Fatal reach the API side
        self.output.connect(output_addr)
        self.encoder = FromEngineEncoder()
        self.decoder = ToEngineDecoder()
        self.poller = zmq.Poller()
        self.poller.register(self.input, zmq.POLLIN)
        self.core: EngineCore | None = None  # set by load()
        self.stop = False
        # Adds / aborts change the stats without producing outputs: push fresh stats anyway,
        # so the API side's `stats` never shows an aborted request as still running.
        self.stats_dirty = False

    def send(self, msg: FromEngine) -> None:
        self.output.send(self.encoder.encode(msg), copy=False)

    def close(self) -> None:
        if self.core is not None:
            self.core.close()
        self.input.close()
        self.output.close()
        self.ctx.term()

    def load(self, config: EngineConfig) -> None:
        from tokenmill.runner.loading import build_core

        built = build_core(config)
        self.core = built.core
        grammar = built.runner.grammar
        if grammar is not None:  # build the grammar tokenizer now, not on the first request
            threading.Thread(target=lambda: getattr(grammar, "tokenizer", None),
                             name="grammar-tokenizer", daemon=True).start()
        info = built.engine_info()
        logger.info("engine ready: %s, %d KV blocks of %d, max_model_len %d", info.model_id,
                    info.num_kv_blocks, info.block_size, info.max_model_len)
        self.send(Ready(info))

    def handle(self, frame: bytes) -> None:
        core = self.core
        assert core is not None
        try:
            msg = self.decoder.decode(frame)
        except msgspec.DecodeError as e:
            logger.error("dropping a malformed message (%d bytes): %s", len(frame), e)
            return
        if isinstance(msg, AddRequest):
            self.stats_dirty = True
            try:
                core.add_request(msg.request)
            except ValueError as e:
                self.send(RequestFailed(msg.request.request_id, str(e)))
        elif isinstance(msg, AbortRequests):
            self.stats_dirty = True
            for rid in msg.request_ids:
                core.abort(rid)
        elif isinstance(msg, Ping):
            self.send(Pong(msg.nonce, collect_stats(core)))
        elif isinstance(msg, LoadAdapter):
            core.load_adapter(msg.name, msg.path, self._adapter_reply(msg.nonce))
        elif isinstance(msg, UnloadAdapter):
            self.stats_dirty = True
            core.unload_adapter(msg.name, self._adapter_reply(msg.nonce))
        elif isinstance(msg, Shutdown):
            self.stop = True

    def _adapter_reply(self, nonce: int) -> Callable[[str | None], None]:
        return lambda error: self.send(AdapterDone(nonce, error))

    def run(self) -> None:
        core = self.core
        assert core is not None
        while not self.stop:
            busy = core.has_unfinished
            if busy or self.poller.poll(IDLE_POLL_MS):
                while not self.stop:  # drain everything that has arrived
                    try:
                        frame = self.input.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self.handle(frame)
            if self.stop:
                break
            core.poll_adapters()
            outputs = core.step() if core.has_unfinished else []
            if outputs or self.stats_dirty:
                self.send(Outputs(outputs, collect_stats(core)))
                self.stats_dirty = False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tokenmill.engine.proc", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-json", required=True)
    p.add_argument("--input", required=True, help="address to receive requests from (PULL)")
    p.add_argument("--output", required=True, help="address to send outputs to (PUSH)")
    p.add_argument("--log-level", default=os.environ.get("TOKENMILL_LOG_LEVEL", "WARNING"))
    a = p.parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(),
                        format="%(asctime)s %(levelname)s [engine] %(name)s: %(message)s")
    threading.Thread(target=_watch_parent, args=(os.getppid(), _socket_dir(a.input, a.output)),
                     name="parent-watch", daemon=True).start()
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)

    proc = EngineProc(a.input, a.output)
    try:
        try:
            config = msgspec.json.decode(a.config_json, type=EngineConfig)
        except (msgspec.DecodeError, ValueError, TypeError) as e:
            proc.send(Fatal(f"invalid engine config: {e}"))
            return 1
        try:
            _set_threads()
            proc.load(config)
        except _Terminate:
            return 0
        except Exception as e:
            from tokenmill.loader import ModelLoadError

            is_load = isinstance(e, ModelLoadError)
            if not is_load:
                logger.exception("engine failed to start")
            msg = str(e) if is_load else f"{type(e).__name__}: {e}"
            proc.send(Fatal(msg, load_error=is_load))
            return 1
        try:
            proc.run()
        except _Terminate:
            return 0
        except BaseException as e:
            logger.exception("engine loop died")
            proc.send(Fatal(f"engine loop died: {type(e).__name__}: {e}"))
            return 1
        return 0
    finally:
        proc.close()


if __name__ == "__main__":
    sys.exit(main())
