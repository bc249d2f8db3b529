"""`--quantize int4` and `w4a8` on their own: aten's packed int4 kernel and the native int4 x
int8 kernel against the bfloat16 matmul on SmolLM2's layer shapes (µs per call, one process),
and how often each LM-head quantization picks the unquantized head's top token
(teacher-forced positions of a few texts, float32).

    .venv/bin/python benchmarks/int4_kernels.py
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch

from tokenmill.config import ModelConfig
from tokenmill.layers.attention import TorchPagedAttention
from tokenmill.layers.quant import (
    Int4Weight,
    QuantWeight,
    ResidualWeight,
    W4A8Weight,
    W8A8Weight,
)
from tokenmill.runner.loading import load_model

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate/up": (3072, 576), "down": (576, 1536),
          "LM head": (49152, 576)}
TEXTS = ["The capital of France is Paris, and the capital of Germany is Berlin. Both cities are",
         "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
         "Once upon a time, in a small village at the edge of the forest, there lived an old",
         "Photosynthesis is the process by which green plants use sunlight to"]


def timed(fn: Callable[[], object], n: int = 50) -> float:
    for _ in range(5):
        fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e6


def kernels() -> None:
    print("| weight | N x K | rows | bf16 us | int4 us | w4a8 us | bf16 / int4 | bf16 / w4a8 |"
          "\n|---|---|---|---:|---:|---:|---:|---:|")
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, dtype=torch.bfloat16) * 0.05
        q, _ = Int4Weight.quantize(w, torch.bfloat16)
        q8, _ = W4A8Weight.quantize(w, torch.bfloat16)
        for rows in (1, 4, 8, 16, 32):
            x = torch.randn(rows, k, dtype=torch.bfloat16)
            tb = timed(lambda: torch.nn.functional.linear(x, w))  # noqa: B023
            ti = timed(lambda: q.matmul(x))  # noqa: B023
            t8 = timed(lambda: q8.matmul(x))  # noqa: B023
            print(f"| {name} | {n} x {k} | {rows} | {tb:.0f} | {ti:.0f} | {t8:.0f} "
                  f"| {tb / ti:.2f}x | {tb / t8:.2f}x |")


def heads() -> None:
    """The LM head as each method serves it: int4 + int4 residual (aten, two passes) and
    w4a8's int8 weights x int8 activations (one pass)."""
    n, k = SHAPES["LM head"]
    w = torch.randn(n, k, dtype=torch.bfloat16) * 0.05
    int4, _ = ResidualWeight.quantize(w, torch.bfloat16)
    int8, _ = W8A8Weight.quantize(w, torch.bfloat16)
    print("\n| LM head rows | bf16 us | int4 + residual us | w4a8 head (int8) us | bf16 / int8 |"
          "\n|---|---:|---:|---:|---:|")
    for rows in (1, 8, 32, 64):
        x = torch.randn(rows, k, dtype=torch.bfloat16)
        tb = timed(lambda: torch.nn.functional.linear(x, w), 10)  # noqa: B023
        ti = timed(lambda: int4.matmul(x), 10)  # noqa: B023
        t8 = timed(lambda: int8.matmul(x), 10)  # noqa: B023
        print(f"| {rows} | {tb:.0f} | {ti:.0f} | {t8:.0f} | {tb / t8:.2f}x |")


def head_agreement() -> None:
    from tokenmill.frontend.llm_engine import load_tokenizer

    lm = load_model(ModelConfig(dtype="float32"))
    model, tok = lm.model, load_tokenizer(lm.source)
    model.bind_kv_cache(torch.zeros(model.kv_cache_shape(64, 16)))
    backend = TorchPagedAttention()
    hidden = []
    with torch.inference_mode():
        for text in TEXTS:
            ids = tok.encode(text)
            meta = backend.build_metadata([len(ids)], [len(ids)], [list(range(64))], 16, None,
                                          torch.device("cpu"))
            hidden.append(model(torch.tensor(ids), torch.arange(len(ids)), meta))
        h, w = torch.cat(hidden), model.lm_head.weight
        ref = h @ w.t()
        heads: dict[str, QuantWeight] = {
            "int4": Int4Weight.quantize(w, torch.float32)[0],
            "int4 + int4 residual": ResidualWeight.quantize(w, torch.float32)[0],
            "int4 + residual, int8 activations":
                ResidualWeight.quantize(w, torch.float32, W4A8Weight)[0],
            "w4a8's: int8 weights (Q8_0-like), int8 activations":
                W8A8Weight.quantize(w, torch.float32)[0],
        }
        for name, head in heads.items():
            logits = head.matmul(h)
            top1 = (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
            kl = torch.nn.functional.kl_div(logits.log_softmax(-1), ref.log_softmax(-1),
                                            log_target=True, reduction="batchmean").item()
            print(f"LM head {name}: {h.shape[0]} positions, top-1 agreement "
                  f"{top1:.0%}, KL {kl:.4f}")


def main() -> None:
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    print(f"load average {os.getloadavg()[0]:.2f}, {torch.get_num_threads()} threads")
    kernels()
    heads()
    head_agreement()


if __name__ == "__main__":
    main()
