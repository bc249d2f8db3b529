"""Scheduler and KV manager against the slot-checking fake runner: no model, milliseconds."""

from __future__ import annotations

import subprocess
import sys

from fake_runner import FakeRunner, expected_output

from tokenmill.config import SchedulerConfig
from tokenmill.engine.core import EngineCore
from tokenmill.engine.kv_cache import KVCacheManager
from tokenmill.engine.scheduler import Scheduler
from tokenmill.protocol import EngineRequest, FinishReason, SamplingParams


def make_engine(num_blocks: int = 64, block_size: int = 4, budget: int = 32,
                max_model_len: int = 10_000, max_num_seqs: int = 64,
                prefix: bool = True) -> tuple[EngineCore, KVCacheManager, FakeRunner]:
    kv = KVCacheManager(num_blocks, block_size, prefix)
    sched = Scheduler(SchedulerConfig(max_batch_prefill_tokens=budget,
                                      max_num_seqs=max_num_seqs), kv,
                      min(max_model_len, num_blocks * block_size))
    runner = FakeRunner(num_blocks, block_size)
    return EngineCore(sched, runner), kv, runner


def add(core: EngineCore, rid: str, prompt: list[int], max_new: int = 8,
        eos: list[int] | None = None, **kw: object) -> None:
    core.add_request(EngineRequest(request_id=rid, prompt_token_ids=prompt,
                                   params=SamplingParams(max_new_tokens=max_new, **kw),
                                   eos_token_ids=eos or []))


def run_all(core: EngineCore, max_steps: int = 10_000) -> dict[str, tuple[list[int], object]]:
    outs: dict[str, list[int]] = {}
    reasons: dict[str, object] = {}
    for _ in range(max_steps):
        if not core.has_unfinished:
            break
        for eo in core.step():
            outs.setdefault(eo.request_id, []).extend(eo.new_token_ids)
            if eo.finish_reason is not None:
                reasons[eo.request_id] = eo.finish_reason
    assert not core.has_unfinished, "engine did not finish"
    return {k: (v, reasons.get(k)) for k, v in outs.items()}


def assert_all_free(kv: KVCacheManager) -> None:
    assert kv.num_free_blocks == kv.num_blocks
    assert all(b.ref_count == 0 for b in kv.blocks)


def test_outputs_match_and_blocks_return() -> None:
    core, kv, _ = make_engine()
    prompts = {f"r{i}": list(range(i, i + 3 + 5 * i)) for i in range(6)}
    for rid, p in prompts.items():
        add(core, rid, p, max_new=7)
    res = run_all(core)
    for rid, p in prompts.items():
        assert res[rid] == (expected_output(p, 7), FinishReason.LENGTH)
    assert_all_free(kv)


def test_chunked_prefill_mixes_with_decode() -> None:
    core, kv, _ = make_engine(budget=8)
    add(core, "short", [1, 2, 3], max_new=20)
    core.step()  # short is decoding now
    add(core, "long", list(range(100, 140)), max_new=3)
    so = core.scheduler.schedule()
    sizes = {c.request_id: len(c.token_ids) for c in so.chunks}
    assert sizes == {"short": 1, "long": 7}  # one decode + a prefill chunk within budget 8
    core.scheduler.update(so, core.runner.execute(so))
    res = run_all(core)
    assert res["long"][0] == expected_output(list(range(100, 140)), 3)
    assert_all_free(kv)


def test_eos_and_min_new_tokens() -> None:
    core, kv, _ = make_engine()
    p = [5, 6, 7]
    exp = expected_output(p, 50)
    eos = exp[3]
    add(core, "a", p, max_new=50, eos=[eos])
    add(core, "b", [9, *p], max_new=50, eos=[eos], ignore_eos=True)
    res = run_all(core)
    assert res["a"] == (exp[:4], FinishReason.EOS)
    assert res["b"][1] == FinishReason.LENGTH and len(res["b"][0]) == 50
    assert_all_free(kv)


def test_preemption_gives_same_outputs() -> None:
    prompts = {f"r{i}": [i] * (10 + 3 * i) for i in range(8)}
    free_core, _, _ = make_engine(num_blocks=512)
    for rid, p in prompts.items():
        add(free_core, rid, p, max_new=30)
    unconstrained = run_all(free_core)

    core, kv, _ = make_engine(num_blocks=24, budget=64)  # 96 slots for ~8 x 50 tokens
    for rid, p in prompts.items():
        add(core, rid, p, max_new=30)
    res = run_all(core)
    assert core.scheduler.num_preemptions > 0
    assert res == unconstrained
    assert_all_free(kv)


def test_prefix_cache_skips_shared_prefix() -> None:
    core, kv, runner = make_engine(num_blocks=256, block_size=16, budget=512)
    shared = list(range(1, 201))  # a 200-token shared prefix
    add(core, "first", [*shared, 7, 8, 9], max_new=5)
    first = run_all(core)
    before = runner.tokens_computed
    add(core, "second", [*shared, 7, 8, 9], max_new=5)
    second = run_all(core)
    prefill_second = runner.tokens_computed - before - 4  # minus the decode steps
    assert second["second"] == first["first"]
    assert prefill_second <= 0.1 * 203, prefill_second
    assert kv.prefix_hits >= 192
    # Another adapter must not share the cache
    add(core, "other", [*shared, 7, 8, 9], max_new=5)
    core.scheduler.waiting[0].adapter_id = "lora-x"
    before = runner.tokens_computed
    run_all(core)
    assert runner.tokens_computed - before >= 203
    assert_all_free(kv)


def test_abort_frees_blocks_everywhere() -> None:
    core, kv, _ = make_engine(budget=8)
    add(core, "queued", list(range(50)), max_new=5)
    add(core, "prefilling", list(range(60)), max_new=5)
    core.step()
    assert core.abort("queued") and core.abort("prefilling")
    assert not core.abort("nope")
    add(core, "x", [1, 2], max_new=4)
    run_all(core)
    assert_all_free(kv)


def test_too_long_prompt_rejected() -> None:
    core, _, _ = make_engine(num_blocks=4, block_size=4)
    import pytest

    with pytest.raises(ValueError, match="at most 15"):
        add(core, "big", list(range(16)))
    with pytest.raises(ValueError, match="at least one token"):
        add(core, "empty", [])


def test_scheduler_and_kv_do_not_import_torch() -> None:
    code = ("import sys; import tokenmill.engine.scheduler, tokenmill.engine.core; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
