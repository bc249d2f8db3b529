"""The engine step: schedule → run → update. No torch here; the runner is injected.

The core also owns the set of LoRA adapters the engine knows. Loading reads and checks the
adapter files on a worker thread (the batch keeps running) and registers the result on the
loop's thread at its next `poll_adapters()`; unloading waits until no request uses the adapter.
"""

from __future__ import annotations

import itertools
import queue
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from tokenmill.engine.outputs import RunnerOutput, SchedulerOutput
from tokenmill.engine.request import Request
from tokenmill.engine.scheduler import Scheduler
from tokenmill.protocol import EngineOutput, EngineRequest

# Called on the engine loop's thread with None (done) or a user-facing error message.
Reply = Callable[[str | None], None]


class Runner(Protocol):
    def execute(self, so: SchedulerOutput) -> RunnerOutput: ...


class EngineCore:
    def __init__(self, scheduler: Scheduler, runner: Runner, seed: int = 0) -> None:
        self.scheduler = scheduler
        self.runner = runner
        # Draws the seed of requests that bring none; the seed is reported back so that
        # any sampled answer can be reproduced.
        self._rng = random.Random(seed)
        self.num_steps = 0
        self.adapters: dict[str, str] = {}  # name -> prefix-cache salt (name + generation)
        self._generation = itertools.count()
        self._loading: set[str] = set()
        self._unloading: dict[str, list[Reply]] = {}
        self._loaded: queue.SimpleQueue[tuple[str, Any, Reply]] = queue.SimpleQueue()
        self._pool: ThreadPoolExecutor | None = None

    def add_request(self, er: EngineRequest) -> None:
        er.params.validate()
        salt = None
        if er.adapter_id is not None:
            salt = self.adapters.get(er.adapter_id)
            if salt is None or er.adapter_id in self._unloading:
                raise ValueError(f"adapter '{er.adapter_id}' is not loaded")
        seed = er.params.seed if er.params.seed is not None else self._rng.getrandbits(63)
        self.scheduler.add_request(Request(
            request_id=er.request_id, prompt_token_ids=list(er.prompt_token_ids),
            params=er.params, seed=seed, eos_token_ids=frozenset(er.eos_token_ids),
            adapter_id=er.adapter_id, cache_salt=salt,
            arrival_time=er.arrival_time or time.monotonic()))

    def abort(self, request_id: str) -> bool:
        return self.scheduler.abort_request(request_id)

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    def step(self) -> list[EngineOutput]:
        so = self.scheduler.schedule()
        if (so.is_empty and not so.finished_req_ids and not so.preempted_req_ids
                and not so.lora_loads):
            return []
        ro = self.runner.execute(so)
        self.num_steps += 1
        return self.scheduler.update(so, ro)

    # ---- LoRA adapters ------------------------------------------------------------------
    def register_adapter(self, name: str, adapter: Any) -> None:
        """Make an adapter read by `runner.read_adapter` usable (on the loop's thread)."""
        if name in self.adapters:
            raise ValueError(f"adapter '{name}' is already loaded")
        self.runner.add_adapter(name, adapter)  # type: ignore[attr-defined]
        self.adapters[name] = f"{name}#{next(self._generation)}"

    def load_adapter(self, name: str, path: str, reply: Reply) -> None:
        """Read `path` off the loop's thread; `reply` comes from a later `poll_adapters()`."""
        if name in self.adapters or name in self._loading:
            reply(f"adapter '{name}' is already loaded" if name in self.adapters
                  else f"adapter '{name}' is being loaded")
            return
        self._loading.add(name)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="tokenmill-lora-load")

        def read() -> None:
            try:
                result: Any = self.runner.read_adapter(name, path)  # type: ignore[attr-defined]
            except ValueError as e:  # AdapterError: bad files, shapes, fields
                result = e
            except Exception as e:  # an I/O error is still the caller's problem, not fatal
                result = ValueError(f"{type(e).__name__}: {e}")
            self._loaded.put((name, result, reply))

        self._pool.submit(read)

    def unload_adapter(self, name: str, reply: Reply) -> None:
        """Refuse new requests for `name` now; drop it once its requests have finished."""
        if name not in self.adapters:
            reply(f"adapter '{name}' is not loaded")
            return
        self._unloading.setdefault(name, []).append(reply)

    def poll_adapters(self) -> None:
        """Finish loads and unloads that are ready (call between steps, on the loop's thread)."""
        while True:
            try:
                name, result, reply = self._loaded.get_nowait()
            except queue.Empty:
                break
            self._loading.discard(name)
            if isinstance(result, BaseException):
                reply(str(result))
                continue
            try:
                self.register_adapter(name, result)
            except ValueError as e:
                reply(str(e))
            else:
                reply(None)
        if not self._unloading:
            return
        busy = {r.adapter_id for r in self.scheduler.requests.values()}
        for name in [n for n in self._unloading if n not in busy]:
            self.runner.remove_adapter(name)  # type: ignore[attr-defined]
            self.scheduler.adapters.evict(name)
            del self.adapters[name]
            for reply in self._unloading.pop(name):
                reply(None)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
