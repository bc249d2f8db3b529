"""The native weights in 2 MB pages (`runner/weight_arena.py`) against the same weights where
loading left them (4 KB pages), in one process: one `LLM`, its weights copied into the arena
once, and during one long generation the layers pointed at either copy in turn every
`--steps` engine steps, so both see the same contexts and the same moments of the host.

    .venv/bin/python benchmarks/huge_pages.py [--batches 1 64] [--blocks 60] [--steps 10]
        [--quantize none]

Prints, per batch size, the median decode step (ms) with each copy and their ratio (> 1:
huge pages faster).
"""

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ["TOKENMILL_HUGE_PAGES"] = "0"  # loading leaves the weights where they are

import offline_throughput as ot

from tokenmill.llm import LLM
from tokenmill.models.fused_stack import FusedStack
from tokenmill.protocol import SamplingParams
from tokenmill.runner.weight_arena import (
    huge_pages_available,
    native_weight_buffers,
    place_in_arena,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--blocks", type=int, default=60, help="alternations per batch size")
    ap.add_argument("--steps", type=int, default=10, help="engine steps per block")
    ap.add_argument("--quantize", default=None, help="tokenmill's --quantize (none: dense)")
    ap.add_argument("--kv-cache-dtype", default="int8")
    a = ap.parse_args()
    if not huge_pages_available():
        raise SystemExit("no transparent huge pages here (not Linux, or THP `never`)")
    print(f"load average {os.getloadavg()[0]:.2f}")
    llm = LLM(kv_cache_dtype=a.kv_cache_dtype, quantize=a.quantize)
    model = llm.engine.core.runner.model
    buffers = native_weight_buffers(model)
    plain = [getattr(o, n) for o, n in buffers]
    if place_in_arena(buffers) is None:
        raise SystemExit("no native weights to place (no native CPU kernels?)")
    huge = [getattr(o, n) for o, n in buffers]
    rollup = Path("/proc/self/smaps_rollup").read_text().splitlines()
    print(f"{len(buffers)} tensors, {sum(t.numel() * t.element_size() for t in huge) / 2**20:.0f}"
          " MB placed; " + next((line for line in rollup if line.startswith("AnonHuge")), ""))

    def use(copies: list) -> None:
        for (owner, name), t in zip(buffers, copies):
            setattr(owner, name, t)
        model.fused_stack = FusedStack.build(model)

    engine = llm.engine
    for batch in a.batches:
        params = SamplingParams(max_new_tokens=a.blocks * a.steps + 40, ignore_eos=True,
                                temperature=0)
        for p in ot.make_prompts(llm.tokenizer, batch, 64, seed=batch):
            engine.add_request(p, params)
        for _ in range(20):  # the prompts' prefill and a few decode steps
            engine.step()
        times: dict[str, list[float]] = {"4k": [], "2m": []}
        for block in range(a.blocks):
            tag, copies = (("4k", plain), ("2m", huge))[block % 2]
            use(copies)
            for _ in range(a.steps):
                t = time.perf_counter()
                engine.step()
                times[tag].append(time.perf_counter() - t)
        while engine.has_unfinished:
            engine.step()
        small, big = statistics.median(times["4k"]), statistics.median(times["2m"])
        print(f"{batch} rows: decode step 4 KB pages {small * 1e3:.3f} ms, 2 MB pages "
              f"{big * 1e3:.3f} ms: {small / big:.3f}x", flush=True)
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
