"""LoRA adapter slots, swapping, hot load and unload in the engine core: no model, no torch.

A fake runner tracks which adapter each device slot holds (from `SchedulerOutput.lora_loads`)
and fails if a request runs while its slot holds another adapter."""

from __future__ import annotations

import random

import pytest
from fake_runner import FakeRunner, expected_output

from tokenmill.config import SchedulerConfig
from tokenmill.engine.adapters import AdapterSlots
from tokenmill.engine.core import EngineCore
from tokenmill.engine.kv_cache import KVCacheManager
from tokenmill.engine.outputs import RunnerOutput, SchedulerOutput
from tokenmill.engine.scheduler import Scheduler
from tokenmill.protocol import EngineRequest, SamplingParams


class SlotRunner(FakeRunner):
    def __init__(self, num_blocks: int, block_size: int, capacity: int) -> None:
        super().__init__(num_blocks, block_size)
        self.capacity = capacity
        self.host: set[str] = set()
        self.slot_names: dict[int, str] = {}
        self.req_slot: dict[str, tuple[int, str]] = {}
        self.max_distinct = 0
        self.swaps = 0

    def read_adapter(self, name: str, path: str) -> str:
        if "bad" in path:
            raise ValueError(f"{path}: adapter_config.json: use_dora: not supported")
        return name

    def add_adapter(self, name: str, adapter: str) -> None:
        self.host.add(name)

    def remove_adapter(self, name: str) -> None:
        self.host.remove(name)
        for slot in [s for s, n in self.slot_names.items() if n == name]:
            del self.slot_names[slot]

    def execute(self, so: SchedulerOutput) -> RunnerOutput:
        for slot, name in so.lora_loads:
            assert 0 <= slot < self.capacity and name in self.host
            self.slot_names[slot] = name
            self.swaps += 1
        for rid in (*so.finished_req_ids, *so.preempted_req_ids):
            self.req_slot.pop(rid, None)
        for nr in so.new_requests:
            if nr.adapter_id is not None:
                self.req_slot[nr.request_id] = (nr.lora_slot, nr.adapter_id)
            else:
                assert nr.lora_slot == -1
        used = set()
        for c in so.chunks:
            if c.request_id in self.req_slot:
                slot, name = self.req_slot[c.request_id]
                assert self.slot_names.get(slot) == name, "a running request lost its slot"
                used.add(name)
        self.max_distinct = max(self.max_distinct, len(used))
        return super().execute(so)


def make(capacity: int, budget: int = 64) -> tuple[EngineCore, SlotRunner]:
    kv = KVCacheManager(512, 4, True)
    sched = Scheduler(SchedulerConfig(max_batch_prefill_tokens=budget, max_active_adapters=capacity),
                      kv, 2048)
    runner = SlotRunner(512, 4, capacity)
    return EngineCore(sched, runner), runner


def register(core: EngineCore, *names: str) -> None:
    for n in names:
        core.register_adapter(n, n)


def add(core: EngineCore, rid: str, prompt: list[int], adapter: str | None, max_new: int = 8,
        ) -> None:
    core.add_request(EngineRequest(request_id=rid, prompt_token_ids=prompt,
                                   params=SamplingParams(max_new_tokens=max_new),
                                   adapter_id=adapter))


def run(core: EngineCore, limit: int = 5000) -> dict[str, list[int]]:
    outs: dict[str, list[int]] = {}
    for _ in range(limit):
        core.poll_adapters()
        if not core.has_unfinished:
            break
        for eo in core.step():
            outs.setdefault(eo.request_id, []).extend(eo.new_token_ids)
    assert not core.has_unfinished
    return outs


def test_slots_lru_and_pins() -> None:
    s = AdapterSlots(2)
    assert s.acquire("a") == (0, True) and s.acquire("b") == (1, True)
    assert s.acquire("a") == (0, False)  # already resident: no copy
    assert s.acquire("c") is None  # both pinned
    s.release("b")
    assert s.acquire("c") == (1, True)  # b was the least recently used unpinned one
    s.release("a")
    s.release("a")
    assert s.acquire("b") == (0, True) and s.resident == ["c", "b"]
    assert s.evict("c") == 1 and s.acquire("d") == (1, True)
    with pytest.raises(ValueError):
        AdapterSlots(0)


def test_more_adapters_than_slots_all_correct_and_base_never_blocked() -> None:
    core, runner = make(capacity=2)
    names = [f"lora{i}" for i in range(6)]
    register(core, *names)
    rng = random.Random(0)
    expected = {}
    for i in range(40):
        prompt = [rng.randrange(1, 900) for _ in range(rng.randrange(3, 30))]
        adapter = None if i % 4 == 0 else rng.choice(names)
        max_new = rng.randrange(2, 12)
        add(core, f"r{i}", prompt, adapter, max_new)
        expected[f"r{i}"] = expected_output(prompt, max_new)
    assert run(core) == expected
    assert runner.max_distinct == 2  # never more adapters in a step than slots
    assert runner.swaps > 6  # adapters were swapped in and out
    assert not core.scheduler.adapters.pins


def test_waiting_adapter_does_not_block_the_batch() -> None:
    core, _ = make(capacity=1)
    register(core, "a", "b")
    add(core, "long-a", [1, 2, 3], "a", max_new=40)
    core.step()
    add(core, "b", [4, 5, 6], "b", max_new=4)  # needs the only slot, which "a" pins
    add(core, "base", [7, 8, 9], None, max_new=4)
    finished: dict[str, int] = {}
    step = 0
    while core.has_unfinished:
        step += 1
        for eo in core.step():
            if eo.finish_reason is not None:
                finished[eo.request_id] = step
    assert finished["base"] < finished["long-a"] < finished["b"]


def _reply_box() -> tuple[list[str | None], object]:
    box: list[str | None] = []
    return box, box.append


def test_hot_load_unload_and_salt() -> None:
    core, runner = make(capacity=2)
    box, reply = _reply_box()
    core.load_adapter("x", "/adapters/x", reply)  # type: ignore[arg-type]
    core.load_adapter("x", "/adapters/x", reply)  # type: ignore[arg-type]
    for _ in range(200):
        core.poll_adapters()
        if len(box) == 2:
            break
        import time

        time.sleep(0.01)
    assert box == ["adapter 'x' is being loaded", None]
    salt1 = core.adapters["x"]
    bad_box, bad_reply = _reply_box()
    core.load_adapter("y", "/adapters/bad", bad_reply)  # type: ignore[arg-type]
    while not bad_box:
        core.poll_adapters()
    assert "use_dora" in (bad_box[0] or "") and "y" not in core.adapters

    add(core, "running", [1, 2, 3], "x", max_new=20)
    outs = {eo.request_id: list(eo.new_token_ids) for eo in core.step()}
    un_box, un_reply = _reply_box()
    core.unload_adapter("x", un_reply)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not loaded"):
        add(core, "late", [1, 2, 3], "x")
    while core.has_unfinished:
        core.poll_adapters()
        assert not un_box, "unloaded while a request still used it"
        for eo in core.step():
            outs.setdefault(eo.request_id, []).extend(eo.new_token_ids)
    core.poll_adapters()
    assert un_box == [None] and "x" not in core.adapters and "x" not in runner.host
    assert outs["running"] == expected_output([1, 2, 3], 20)
    assert core.scheduler.adapters.slot_of == {}
    # Loaded again under the same name: a new prefix-cache salt, so no stale KV reuse.
    register(core, "x")
    assert core.adapters["x"] != salt1
    miss_box, miss_reply = _reply_box()
    core.unload_adapter("nope", miss_reply)  # type: ignore[arg-type]
    assert miss_box == ["adapter 'nope' is not loaded"]
    core.close()
