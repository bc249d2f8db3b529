"""LoRA on the real default model (float32): more adapters than device slots, mixed with the
base model in one batch, swapped in and out LRU; loading and unloading at run time."""

from __future__ import annotations

import pytest

from lora_files import write_adapter
from tokenmill.protocol import SamplingParams

PROMPTS = ["The capital of France is", "def fib(n):"]
PARAMS = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
CONFIGS = {  # different ranks and target modules
    "qv4": dict(rank=4, targets=("q_proj", "v_proj")),
    "all8": dict(rank=8, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                  "up_proj", "down_proj")),
    "mlp16": dict(rank=16, targets=("gate_proj", "down_proj")),
    "o2": dict(rank=2, targets=("o_proj",), b_scale=0.5),
}


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {name: write_adapter(root / name, seed=i, **cfg)  # type: ignore[arg-type]
            for i, (name, cfg) in enumerate(CONFIGS.items())}


@pytest.fixture(scope="module")
def llm(adapter_dirs):
    from tokenmill.llm import LLM

    return LLM(dtype="float32", max_batch_total_tokens=4096, max_active_adapters=2,
               lora_adapters=[f"{n}={p}" for n, p in adapter_dirs.items()])


def run(eng, rows: list[tuple[int, str | None]]) -> dict[tuple[int, str | None], list[int]]:
    rids = {eng.add_request(PROMPTS[i], PARAMS, adapter_id=a): (i, a) for i, a in rows}
    got = {}
    while eng.has_unfinished:
        for out in eng.step():
            if out.finished:
                got[rids[out.request_id]] = out.token_ids
    return got


def test_mixed_batch_with_swaps_equals_solo_runs(llm) -> None:
    eng = llm.engine
    rows = [(i, a) for i in range(len(PROMPTS)) for a in (None, *CONFIGS)]
    solo = {}
    for row in rows:
        solo.update(run(eng, [row]))
    swaps_before = eng.scheduler.adapters.num_swaps
    mixed = run(eng, rows)
    assert mixed == solo
    assert eng.scheduler.adapters.num_swaps > swaps_before  # 4 adapters through 2 slots
    outputs = {tuple(v) for (i, _), v in solo.items() if i == 0}
    assert len(outputs) == 1 + len(CONFIGS)  # every adapter changes the output


def test_load_and_unload_at_run_time(llm, adapter_dirs) -> None:
    eng = llm.engine
    before = run(eng, [(0, "qv4")])[(0, "qv4")]
    eng.load_adapter("copy", str(adapter_dirs["qv4"]))
    assert "copy" in eng.info.adapters
    assert run(eng, [(0, "copy")])[(0, "copy")] == before
    with pytest.raises(ValueError, match="already loaded"):
        eng.load_adapter("copy", str(adapter_dirs["qv4"]))
    eng.unload_adapter("copy")
    with pytest.raises(ValueError, match="not loaded"):
        eng.add_request(PROMPTS[0], PARAMS, adapter_id="copy")
    # The same name now with other weights: the prefix cache must not serve the old KV.
    eng.load_adapter("copy", str(adapter_dirs["all8"]))
    assert run(eng, [(0, "copy")])[(0, "copy")] == run(eng, [(0, "all8")])[(0, "all8")]
    eng.unload_adapter("copy")
    with pytest.raises(LookupError):
        eng.unload_adapter("copy")


def test_cpu_steps_run_the_native_kernel_and_match_the_torch_path(llm, monkeypatch) -> None:
    """The stacks the manager builds are in the native kernel's layout (so the oracle and
    mixed-batch tests above exercise it), and its tokens equal the torch path's."""
    from tokenmill.kernels.cpu import cpu_kernels
    from tokenmill.lora import punica

    kernel = cpu_kernels()
    if kernel is None:
        pytest.skip("no C++ compiler: the native CPU kernels are not built")
    eng = llm.engine
    rows = [(i, a) for i in range(len(PROMPTS)) for a in ("qv4", "all8")]
    calls: list[int] = []
    monkeypatch.setattr(kernel, "lora_sgmv",
                        lambda *a, f=kernel.lora_sgmv: calls.append(1) or f(*a))
    native = run(eng, rows)
    assert calls  # every LoRA linear of every step went through the kernel
    monkeypatch.setattr(punica, "cpu_kernels", lambda: None)
    calls.clear()
    assert run(eng, rows) == native and not calls


def test_lora_rows_over_the_int8_kv_cache(adapter_dirs) -> None:
    """`--kv-cache-dtype int8` with w4a8 and adapters: a step with LoRA rows runs layer by
    layer, one without them through the fused stack, both over the int8 cache; each request's
    tokens alone equal its tokens in a mixed batch, and the adapters still change them."""
    from tokenmill.llm import LLM

    llm = LLM(dtype="bfloat16", quantize="w4a8", kv_cache_dtype="int8",
              max_batch_total_tokens=4096,
              lora_adapters=[f"{n}={adapter_dirs[n]}" for n in ("all8", "o2")])
    eng = llm.engine
    rows = [(i, a) for i in range(2) for a in (None, "all8", "o2")]
    solo = {}
    for row in rows:
        solo.update(run(eng, [row]))
    assert run(eng, rows) == solo
    assert len({tuple(v) for (i, _), v in solo.items() if i == 0}) == 3


def test_unloading_the_last_adapter_leaves_no_plan_behind(adapter_dirs) -> None:
    """An engine started without adapters hot-loads one, finishes a step whose adapter row is
    row 1 (a base request beside it), and unloads it. The linears keep their LoRA stacks; the
    next steps must not see that step's plan: it once made the native kernel add into row 1
    of a one-row decode step (heap corruption, the engine aborted), and kept every later step
    off the fused stack."""
    from tokenmill.llm import LLM

    eng = LLM(max_batch_total_tokens=4096).engine  # defaults: w4a8 and the fused stack
    stack = eng.core.runner.model.fused_stack
    assert stack is not None
    base = run(eng, [(1, None)])[(1, None)]
    eng.load_adapter("late", str(adapter_dirs["all8"]))
    both = run(eng, [(0, "late"), (0, None)])
    assert both[(0, "late")] != both[(0, None)]
    eng.unload_adapter("late")
    fused: list[int] = []
    stack.run = lambda *a, f=stack.run, **k: fused.append(1) or f(*a, **k)  # type: ignore
    assert run(eng, [(1, None)])[(1, None)] == base
    assert len(fused) == PARAMS.max_new_tokens  # every step: the prefill and each decode
