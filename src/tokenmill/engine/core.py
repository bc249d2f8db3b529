"""The engine step: schedule → run → update. No torch here; the runner is injected."""

from __future__ import annotations

import random
import time
from typing import Protocol

from tokenmill.engine.outputs import RunnerOutput, SchedulerOutput
from tokenmill.engine.request import Request
from tokenmill.engine.scheduler import Scheduler
from tokenmill.protocol import EngineOutput, EngineRequest


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

    def add_request(self, er: EngineRequest) -> None:
        er.params.validate()
        seed = er.params.seed if er.params.seed is not None else self._rng.getrandbits(63)
        self.scheduler.add_request(Request(
            request_id=er.request_id, prompt_token_ids=list(er.prompt_token_ids),
            params=er.params, seed=seed, eos_token_ids=frozenset(er.eos_token_ids),
            adapter_id=er.adapter_id, arrival_time=er.arrival_time or time.monotonic()))

    def abort(self, request_id: str) -> bool:
        return self.scheduler.abort_request(request_id)

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    def step(self) -> list[EngineOutput]:
        so = self.scheduler.schedule()
        if so.is_empty and not so.finished_req_ids and not so.preempted_req_ids:
            return []
        ro = self.runner.execute(so)
        self.num_steps += 1
        return self.scheduler.update(so, ro)
