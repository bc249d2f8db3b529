"""Batching invariance, preemption, prefix caching and seeded sampling on the real model."""

from __future__ import annotations

import random

import pytest
import torch

from tokenmill.frontend.outputs import RequestOutput
from tokenmill.protocol import SamplingParams

WORDS = ["river", "stone", "light", "garden", "number", "engine", "market", "winter", "letter", "silver", "forest", "question", "music", "window", "history", "planet"]


def mixed_prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 90))) for _ in range(n)]


def run_staggered(llm, prompts: list[str], params: list[SamplingParams],
                  arrivals: list[int]) -> list[RequestOutput]:
    """Feed requests into the running engine at the given step numbers."""
    eng = llm.engine
    pending = sorted(range(len(prompts)), key=lambda i: arrivals[i])
    ids: dict[int, str] = {}
    done: dict[str, RequestOutput] = {}
    step = 0
    while pending or eng.has_unfinished:
        while pending and arrivals[pending[0]] <= step:
            i = pending.pop(0)
            ids[i] = eng.add_request(prompts[i], params[i])
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
        step += 1
    return [done[ids[i]] for i in range(len(prompts))]


def test_greedy_batch_invariance(llm32) -> None:
    prompts = mixed_prompts(16)
    params = [SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True)] * 16
    alone = [llm32.generate(p, params[0])[0].token_ids for p in prompts]
    arrivals = [random.Random(1).randint(0, 30) for _ in prompts]
    batched = run_staggered(llm32, prompts, params, arrivals)
    assert [o.token_ids for o in batched] == alone


def test_seeded_sampling_reproducible_across_batches(llm32) -> None:
    prompts = mixed_prompts(6, seed=3)
    sp = [SamplingParams(max_new_tokens=20, temperature=0.9, top_p=0.9, top_k=50, seed=1234 + i,
                         ignore_eos=True) for i in range(6)]
    alone = [llm32.generate(p, s)[0].token_ids for p, s in zip(prompts, sp)]
    others = mixed_prompts(10, seed=4)
    noise = [SamplingParams(max_new_tokens=15, temperature=1.3, repetition_penalty=1.2)] * 10
    mixed = run_staggered(llm32, others[:5] + prompts + others[5:], noise[:5] + sp + noise[5:],
                          [0, 2, 1, 0, 5, 3, 0, 7, 1, 0, 4, 0, 0, 2, 9, 1])
    assert [o.token_ids for o in mixed[5:11]] == alone
    assert len({tuple(t) for t in alone}) == 6
    # A request that gives no seed gets one back, and that seed reproduces it.
    first = llm32.generate(prompts[0], SamplingParams(max_new_tokens=12, temperature=1.0))[0]
    assert first.seed is not None
    again = llm32.generate(prompts[0], SamplingParams(max_new_tokens=12, temperature=1.0,
                                                      seed=first.seed))[0]
    assert again.token_ids == first.token_ids


def test_preemption_keeps_outputs(default_gguf) -> None:
    from tokenmill.llm import LLM

    prompts = mixed_prompts(8, seed=5)
    params = SamplingParams(max_new_tokens=40, temperature=0.0, ignore_eos=True)
    roomy = LLM(dtype="float32", device="cpu", max_batch_total_tokens=8192)
    expected = [o.token_ids for o in roomy.generate(prompts, params)]
    del roomy
    tight = LLM(dtype="float32", device="cpu", max_batch_total_tokens=320, block_size=16)
    got = [o.token_ids for o in tight.generate(prompts, params)]
    assert tight.engine.scheduler.num_preemptions > 0
    assert got == expected
    assert tight.engine.kv.num_free_blocks == tight.engine.kv.num_blocks


def test_prefix_cache_reuse(llm32) -> None:
    tok = llm32.tokenizer
    shared = tok.encode(" ".join(WORDS * 13))[:200]
    assert len(shared) == 200
    a = shared + tok.encode(" The first question is")
    b = shared + tok.encode(" The first question is")
    params = SamplingParams(max_new_tokens=16, temperature=0.0)
    first = llm32.generate([a], params)[0]
    second = llm32.generate([b], params)[0]
    computed = len(b) - second.num_cached_tokens
    assert computed <= 0.1 * len(a) - 0, (computed, len(a))
    assert second.token_ids == first.token_ids
    # A different continuation still reuses the shared part.
    third = llm32.generate([shared + tok.encode(" Another ending")], params)[0]
    assert third.num_cached_tokens >= 192


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_engine_matches_cpu(llm32) -> None:
    from tokenmill.llm import LLM

    prompts = mixed_prompts(8, seed=7)
    params = SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True)
    cpu = [o.token_ids for o in llm32.generate(prompts, params)]
    gpu_llm = LLM(dtype="float32", device="cuda", max_batch_total_tokens=32768)
    assert [o.token_ids for o in gpu_llm.generate(prompts, params)] == cpu
    seeded = SamplingParams(max_new_tokens=16, temperature=0.8, top_p=0.9, seed=5)
    assert (gpu_llm.generate(prompts[0], seeded)[0].token_ids
            == llm32.generate(prompts[0], seeded)[0].token_ids)
