"""Dense CPU matmuls on SmolLM2-135M's shapes, three ways in one process: `F.linear` on the plain
weight, oneDNN with the weight reordered once into its blocked layout (`OneDnnWeight`), and
tokenmill's tiles (`TiledWeight`, kernels/csrc/dense.cpp), bfloat16 and float32, µs per call
(best of several rounds over 30 layers' weights, so they stream from memory as in a decode
step) and the ratios to oneDNN; then whole decode steps through `LLM` (tokens/s at 1 and 16
sequences): tiles with the fused stack (the default), tiles layer by layer, oneDNN, plain.

    .venv/bin/python benchmarks/dense_cpu.py [--rounds 5] [--skip-llm]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536),
          "lm_head": (49152, 576)}


def per_call(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
             weights: list[torch.Tensor], x: torch.Tensor, rounds: int) -> float:
    for w in weights:
        fn(x, w)
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for w in weights:
            fn(x, w)
        best = min(best, (time.perf_counter() - t) / len(weights))
    return best


def onednn_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def matmuls(rounds: int) -> None:
    from tokenmill.kernels.cpu import cpu_kernels
    from tokenmill.layers.dense import TiledWeight

    kernels = cpu_kernels()
    if kernels is None:
        raise SystemExit("no native CPU kernels (a C++ compiler is needed)")
    print("shape        dtype     rows   F.linear µs   oneDNN µs   tiles µs   tiles/oneDNN"
          "   oneDNN/F.linear")
    for dtype in (torch.bfloat16, torch.float32):
        for name, (n, k) in SHAPES.items():
            layers = 2 if name == "lm_head" else 30
            plain = [torch.randn(n, k).to(dtype) for _ in range(layers)]
            reordered = [torch.ops.mkldnn._reorder_linear_weight(w, None) for w in plain]
            tiles = [TiledWeight(w, kernels) for w in plain]
            for m in (1, 4, 16, 64, 512):
                x = torch.randn(m, k).to(dtype)
                a = per_call(F.linear, plain, x, rounds)
                b = per_call(onednn_linear, reordered, x, rounds)
                c = per_call(lambda x, t: t.matmul(x, None), tiles, x, rounds)
                print(f"{name:12s} {str(dtype)[6:]:9s} {m:4d} {a * 1e6:13.0f} {b * 1e6:11.0f}"
                      f" {c * 1e6:10.0f} {b / c:12.2f}x {a / b:14.2f}x", flush=True)


def decode(dtype: str) -> None:
    import tokenmill.runner.loading as loading
    from tokenmill import LLM
    from tokenmill.models.fused_stack import FusedStack
    from tokenmill.protocol import SamplingParams

    real, build = loading.prepare_cpu_weights, FusedStack.build
    ways = (("tiles, fused", real, build), ("tiles, layers", real, lambda model: None),
            ("oneDNN", lambda model: real(model, tiled=False), build),
            ("plain", lambda model: (0, 0), build))
    try:
        for label, pack, stack in ways:
            loading.prepare_cpu_weights = pack  # type: ignore[assignment]  # load_model's
            FusedStack.build = stack  # type: ignore[assignment,method-assign]
            llm = LLM(dtype=dtype, quantize="none", device="cpu", max_batch_total_tokens=8192)
            ids = llm.tokenizer.encode("Write a short story about a lighthouse keeper.")
            for n in (1, 16):
                params = SamplingParams(max_new_tokens=64, temperature=0.0, ignore_eos=True)
                llm.generate([ids] * n, SamplingParams(max_new_tokens=4, ignore_eos=True))
                t = time.perf_counter()
                llm.generate([ids] * n, params)
                print(f"decode {dtype:8s} {label:13s} {n:2d} sequences: "
                      f"{n * 64 / (time.perf_counter() - t):7.1f} tokens/s", flush=True)
            del llm
    finally:
        loading.prepare_cpu_weights = real
        FusedStack.build = build  # type: ignore[method-assign]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--skip-llm", action="store_true", help="the matmuls only")
    a = ap.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f}; {torch.get_num_threads()} threads")
    matmuls(a.rounds)
    if not a.skip_llm:
        for dtype in ("bfloat16", "float32"):
            decode(dtype)


if __name__ == "__main__":
    main()
