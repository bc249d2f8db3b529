"""Where an engine step's time goes, offline: N prompts x M new tokens through `LLM`'s engine
with each stage of the step timed (scheduling, attention metadata, the model's forward pass,
the LM head, sampling, the scheduler's update, detokenization), ms per decode step. What the
forward pass leaves is the step's Python.

    .venv/bin/python benchmarks/step_stages.py [--prompts 64] [--new-tokens 128] [--repeats 2]
        [--kv-cache-dtype int8] [--block-size 16] [--quantize none] [--dtype float32]
        [--kernels]

With --kernels, the fused stack (w4a8 or dense tiles) also times each of its kernels (norm, qkv, rotary + cache
write, attention, o, norm, gate/up, SiLU * up, down), ms per decode and per prefill step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

from offline_throughput import make_prompts

from tokenmill.llm import LLM
from tokenmill.models.fused_stack import STAGES
from tokenmill.protocol import SamplingParams


def timed(obj: Any, name: str, into: list[float]) -> None:
    """Replace obj.name by a wrapper appending each call's seconds to `into`."""
    fn: Callable[..., Any] = getattr(obj, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            into.append(time.perf_counter() - t)

    setattr(obj, name, wrapper)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--block-size", type=int, default=None, help="KV cache block (tokens)")
    ap.add_argument("--quantize", default=None, help="tokenmill's --quantize (none: dense)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--kernels", action="store_true",
                    help="also time each kernel of the fused stack (ms per step)")
    a = ap.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f}")
    llm = LLM(kv_cache_dtype=a.kv_cache_dtype, quantize=a.quantize, dtype=a.dtype,
              **({} if a.block_size is None else {"block_size": a.block_size}))
    eng = llm.engine
    core, runner = eng.core, eng.core.runner
    stages: dict[str, list[float]] = {k: [] for k in (
        "step", "schedule", "metadata", "forward", "lm_head", "sample", "update", "detokenize")}
    timed(eng, "step", stages["step"])
    timed(core.scheduler, "schedule", stages["schedule"])
    timed(runner.backend, "build_metadata", stages["metadata"])
    timed(runner.model, "forward", stages["forward"])
    timed(runner.model, "compute_logits", stages["lm_head"])
    timed(runner.sampler, "sample", stages["sample"])
    timed(core.scheduler, "update", stages["update"])
    timed(eng.processor, "process", stages["detokenize"])
    calls = kernel_calls(runner.model.fused_stack) if a.kernels else None
    params = SamplingParams(max_new_tokens=a.new_tokens, temperature=0.0, ignore_eos=True)
    for rep in range(a.repeats):
        for v in stages.values():
            v.clear()
        if calls is not None:
            calls.clear()
        for p in make_prompts(llm.tokenizer, a.prompts, a.prompt_len, seed=rep + 1):
            eng.add_request(p, params)
        while eng.has_unfinished:
            eng.step()
        # Decode steps: the ones that sampled a token for every request and prefilled nothing,
        # i.e. the last new_tokens - 1 (the first token comes with the prefill).
        n = a.new_tokens - 1
        per_step = {k: statistics.mean(v[-n:]) * 1e3 for k, v in stages.items()
                    if k != "detokenize"}
        # called once per request and step
        per_step["detokenize"] = sum(stages["detokenize"][-n * a.prompts:]) / n * 1e3
        python = per_step["step"] - per_step["forward"] - per_step["lm_head"]
        print(f"repeat {rep + 1}: {a.prompts} x {a.new_tokens}, ms per decode step: "
              + ", ".join(f"{k} {v:.3f}" for k, v in per_step.items())
              + f", python {python:.3f} (the step outside the forward pass and the LM head)")
        if calls is not None:
            report_kernels(calls, a.prompts, n)


def kernel_calls(stack: Any) -> list[tuple[int, list[float]]] | None:
    """Time the fused stack's kernels: each run's (rows, seconds per stage) is appended."""
    if stack is None:
        print("--kernels: this model has no fused stack (it needs w4a8 or dense tiles on CPU)")
        return None
    import torch

    stack.stage_seconds = torch.zeros(len(STAGES), dtype=torch.float64)
    calls: list[tuple[int, list[float]]] = []
    run = stack.run

    def timed_run(x: Any, *args: Any, **kwargs: Any) -> Any:
        before = stack.stage_seconds.clone()
        out = run(x, *args, **kwargs)
        calls.append((x.shape[0], (stack.stage_seconds - before).tolist()))
        return out

    stack.run = timed_run
    return calls


def report_kernels(calls: list[tuple[int, list[float]]], prompts: int, n: int) -> None:
    """ms per stage of the last n decode steps (all rows decoding) and of the prefill steps."""
    decode = [(rows, t) for rows, t in calls if rows == prompts][-n:]
    prefill = [(rows, t) for rows, t in calls if rows > prompts]
    for name, runs in (("decode step", decode), ("prefill step", prefill)):
        if not runs:
            continue
        ms = [sum(t[i] for _, t in runs) / len(runs) * 1e3 for i in range(len(STAGES))]
        rows = f" (~{sum(r for r, _ in runs) // len(runs)} rows)" if name == "prefill step" \
            else ""
        print(f"  fused stack, ms per {name}{rows}: "
              + ", ".join(f"{k} {v:.2f}" for k, v in zip(STAGES, ms))
              + f"; total {sum(ms):.2f}")


if __name__ == "__main__":
    main()
