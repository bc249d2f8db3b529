"""Offline speed of tokenmill against transformers' `generate`, measured in the same run.

Prints batch-1 decode tokens/s and the throughput of N prompts x M new tokens for both, and
the ratios. Only ratios from one run are comparable: the machines are shared, so the script
prints the load average before it starts and the CPU other processes took during the run
(tokenmill.bench.machine), and warns when the machine is busy.

    .venv/bin/python benchmarks/offline_throughput.py [--dtype bfloat16] [--prompts 64]
        [--quantize w4a8] [--kv-cache-dtype int8]
"""

from __future__ import annotations

import argparse
import os
import random
import time

import torch

from tokenmill.bench.machine import CpuWatch
from tokenmill.llm import LLM
from tokenmill.protocol import SamplingParams

WORDS = ["river", "stone", "light", "garden", "number", "engine", "market", "winter", "letter", "silver", "forest", "question", "music", "window", "history", "planet"]


def make_prompts(tok, n: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = tok.encode(" ".join(rng.choice(WORDS) for _ in range(length * 2)))
        out.append(ids[:length])
    return out


def bench_tokenmill(llm: LLM, prompts: list[list[int]], new_tokens: int) -> float:
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    dt = time.perf_counter() - t0
    assert all(len(o.token_ids) == new_tokens for o in outs)
    return len(prompts) * new_tokens / dt


def bench_tokenmill_decode(llm: LLM, prompt: list[int], new_tokens: int) -> float:
    """Batch-1 decode rate: tokens after the first over the time after the first."""
    eng = llm.engine
    eng.add_request(prompt, SamplingParams(max_new_tokens=new_tokens, temperature=0.0,
                                           ignore_eos=True))
    n, t_first = 0, 0.0
    while eng.has_unfinished:
        for out in eng.step():
            n += len(out.new_token_ids)
            if n == 1:
                t_first = time.perf_counter()
    return (n - 1) / (time.perf_counter() - t_first)


def bench_transformers(model, prompts: list[list[int]], new_tokens: int, pad: int) -> float:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])  # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
    dt = time.perf_counter() - t0
    assert out.shape[1] == width + new_tokens
    return len(prompts) * new_tokens / dt


def bench_transformers_decode(model, prompt: list[int], new_tokens: int, pad: int) -> float:
    # Decode rate = (tokens after the first) / (total time - time of a 1-token generate).
    ids = torch.tensor([prompt])
    kw = dict(do_sample=False, pad_token_id=pad, attention_mask=torch.ones_like(ids))
    with torch.inference_mode():
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        t1 = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
        t2 = time.perf_counter()
    return (new_tokens - 1) / ((t2 - t1) - (t1 - t0))


def report_sharing(watch: CpuWatch) -> None:
    sharing = watch.result()
    if sharing:
        print(sharing.describe()
              + ("  ** machine busy: ratios are less reliable **" if sharing.busy() else ""))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--quantize", default=None, help="tokenmill's --quantize (int4, w4a8)")
    ap.add_argument("--kv-cache-dtype", default="auto", help="tokenmill's (auto, int8)")
    a = ap.parse_args()

    load1 = os.getloadavg()[0]
    cores = len(os.sched_getaffinity(0))
    print(f"load average {load1:.2f} on {cores} cores"
          + ("  ** machine busy: ratios are less reliable **" if load1 > 0.5 * cores else ""))
    watch = CpuWatch()

    llm = LLM(dtype=a.dtype, max_batch_total_tokens=65536, quantize=a.quantize,
              kv_cache_dtype=a.kv_cache_dtype)
    dtype = getattr(torch, llm.engine.info.dtype)
    print(f"tokenmill: {llm.engine.info.model_id} {llm.engine.info.dtype} "
          f"{torch.get_num_threads()} threads")
    prompts = make_prompts(llm.tokenizer, a.prompts, a.prompt_len)
    bench_tokenmill(llm, prompts[:4], 8)  # warm-up
    tm_decode = bench_tokenmill_decode(llm, prompts[0], a.new_tokens)
    tm_batch = bench_tokenmill(llm, prompts, a.new_tokens)
    print(f"tokenmill     batch-1 decode {tm_decode:8.1f} tok/s   "
          f"{a.prompts}x{a.new_tokens} throughput {tm_batch:8.1f} tok/s")
    if a.skip_transformers:
        report_sharing(watch)
        return

    import transformers

    from tokenmill.loader import default_model_path

    path = default_model_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32).to(dtype).eval()
    pad = llm.engine.info.eos_token_ids[0]
    bench_transformers(model, prompts[:4], 8, pad)  # warm-up
    hf_decode = bench_transformers_decode(model, prompts[0], a.new_tokens, pad)
    hf_batch = bench_transformers(model, prompts, a.new_tokens, pad)
    print(f"transformers  batch-1 decode {hf_decode:8.1f} tok/s   "
          f"{a.prompts}x{a.new_tokens} throughput {hf_batch:8.1f} tok/s")
    print(f"ratio (tokenmill / transformers): batch-1 decode {tm_decode / hf_decode:.2f}x, "
          f"batched throughput {tm_batch / hf_batch:.2f}x")
    report_sharing(watch)


if __name__ == "__main__":
    main()
