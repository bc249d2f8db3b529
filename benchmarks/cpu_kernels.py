"""The native CPU kernels (src/tokenmill/kernels/) against the torch paths they replace, on
SmolLM2-135M's shapes, in one process: µs per call, best of several rounds.

- LoRA SGMV per projection (qkv, o, gate/up, down) at 32 decode rows: one adapter, 8 adapters
  with 4 rows each (neighbouring slots), and 8 adapters with their rows interleaved;
- decode attention from the paged cache (9 query heads over 3 KV heads, head dim 64) at a
  few batch sizes and context lengths, against gather + the torch decode path.

    .venv/bin/python benchmarks/cpu_kernels.py [--dtype bfloat16] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import random
import time
from collections.abc import Callable
from functools import partial

import torch

from tokenmill.kernels.cpu import cpu_kernels, lora_chunks
from tokenmill.layers import kv_int8
from tokenmill.layers.attention import (
    AttentionMetadata,
    RowKeys,
    SeqGroup,
    TorchPagedAttention,
    _gather,
)
from tokenmill.lora.punica import lora_add_, make_plan

LORA_SHAPES = {"qkv": (576, [576, 192, 192], 48), "o": (576, [576], 16),
               "gate/up": (576, [1536, 1536], 32), "down": (1536, [576], 16)}


def best_us(fn: Callable[[], object], rounds: int, n: int = 100) -> float:
    for _ in range(5):
        fn()
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n * 1e6)
    return best


def lora(dtype: torch.dtype, rounds: int) -> None:
    print(f"LoRA, 32 decode rows, rank 16 per projection, {dtype}: µs per call")
    print(f"  {'projection':<10} {'slots':<16} {'native':>8} {'torch':>8} {'ratio':>6}")
    cpu = torch.device("cpu")
    for name, (fan_in, parts, rank) in LORA_SHAPES.items():
        out = sum(parts)
        # the layouts LoraLinear uses on CPU: A and B stored transposed
        a = torch.randn(8, fan_in, rank, dtype=dtype).transpose(1, 2)
        b = (0.1 * torch.randn(8, rank, out)).to(dtype).transpose(1, 2)
        chunks = lora_chunks(parts, rank)
        x, y = torch.randn(32, fan_in, dtype=dtype), torch.zeros(32, out, dtype=dtype)
        for label, slots in (("1 adapter", [0] * 32), ("8 x 4 rows", [i // 4 for i in range(32)]),
                             ("8 interleaved", [i % 8 for i in range(32)])):
            native = make_plan(slots, cpu, cpu=True)
            plain = make_plan(slots, cpu, cpu=False)
            assert native is not None and plain is not None
            tn = best_us(partial(lora_add_, y, x, native, a, b, chunks), rounds)
            tt = best_us(partial(lora_add_, y, x, plain, a, b), rounds)
            print(f"  {name:<10} {label:<16} {tn:8.1f} {tt:8.1f} {tt / tn:5.1f}x")


def _torch_decode(backend: TorchPagedAttention, q: torch.Tensor, cache: torch.Tensor,
                  g: SeqGroup) -> torch.Tensor:
    """What the backend ran before the native kernel: gather each sequence's blocks, then
    batched matmuls with a mask."""
    k, v = _gather(cache[0], g.block_tables), _gather(cache[1], g.block_tables)
    return backend._decode(q, k, v, g.mask, q.shape[-1] ** -0.5)


def _decode_step(backend: TorchPagedAttention, batch: int, ctx: int, bs: int,
                 block_ids: list[int]) -> AttentionMetadata:
    """A decode step of `batch` sequences of `ctx` keys, their blocks taken from `block_ids`
    in order."""
    per_seq = -(-ctx // bs)
    tables = [block_ids[i * per_seq:(i + 1) * per_seq] for i in range(batch)]
    return backend.build_metadata([1] * batch, [ctx] * batch, tables, bs, None,
                                  torch.device("cpu"))


def attention(dtype: torch.dtype, rounds: int) -> None:
    kern = cpu_kernels()
    assert kern is not None
    hq, hk, d, bs = 9, 3, 64, 16
    print(f"decode attention, {hq} query / {hk} KV heads, head dim {d}, {dtype}: µs per call")
    print(f"  {'batch':>5} {'context':>7} {'native':>8} {'torch':>8} {'ratio':>6}")
    backend = TorchPagedAttention()
    for batch, ctx in ((1, 200), (32, 100), (64, 192), (32, 1000)):
        per_seq = -(-ctx // bs)
        cache = torch.randn(2, hk, batch * per_seq, bs, d, dtype=dtype)
        meta = _decode_step(backend, batch, ctx, bs, list(range(batch * per_seq)))
        g, rows = meta.groups[0], meta.rows
        assert rows is not None
        q = torch.randn(batch, hq, d, dtype=dtype)
        tn = best_us(partial(kern.paged_decode, q, cache, rows.tables, rows.bounds,
                             rows.max_keys, d ** -0.5, rows.seq), rounds, n=20)
        tt = best_us(partial(_torch_decode, backend, q, cache, g), rounds, n=20)
        print(f"  {batch:>5} {ctx:>7} {tn:8.0f} {tt:8.0f} {tt / tn:5.1f}x")


def _int8_cache(cache: torch.Tensor) -> torch.Tensor:
    """The same keys and values in the int8 layout (`--kv-cache-dtype int8`)."""
    _, hk, nb, bs, d = cache.shape
    out = torch.zeros(2, hk, nb, kv_int8.block_bytes(bs, d), dtype=torch.int8)
    flat = cache.view(2, hk, nb * bs, d).transpose(1, 2)  # [2, slots, Hk, D]
    kv_int8.write(out, flat[0], flat[1], torch.arange(nb * bs))
    return out


def attention_cold(dtype: torch.dtype, rounds: int, layers: int = 30) -> None:
    """Decode attention as a step meets it: each layer's cache read from memory (30 caches,
    past the L3), with a sequence's blocks contiguous or scattered (as a long-running engine
    leaves them; the kernel prefetches scattered blocks); the model's dtype, then the int8
    cache."""
    kern = cpu_kernels()
    assert kern is not None
    hq, hk, d, bs = 9, 3, 64, 16
    print(f"decode attention, {layers} layers' caches (cold), {dtype} and int8 caches: "
          "µs per layer")
    print(f"  {'batch':>5} {'context':>7} {'contiguous':>10} {'scattered':>10} "
          f"{'int8 cont.':>10} {'int8 scat.':>10}")
    backend = TorchPagedAttention()
    for batch, ctx in ((64, 192), (32, 1000)):
        per_seq = -(-ctx // bs)
        caches = [torch.randn(2, hk, batch * per_seq, bs, d, dtype=dtype) for _ in range(layers)]
        q = torch.randn(batch, hq, d, dtype=dtype)
        ids = list(range(batch * per_seq))
        times = []
        for kind in (caches, [_int8_cache(c) for c in caches]):
            for order in (ids, random.Random(0).sample(ids, len(ids))):
                rows = _decode_step(backend, batch, ctx, bs, order).rows
                assert rows is not None

                def run(rows: RowKeys = rows, q: torch.Tensor = q,
                        caches: list[torch.Tensor] = kind) -> None:
                    for c in caches:
                        kern.paged_decode(q, c, rows.tables, rows.bounds, rows.max_keys,
                                          d ** -0.5, rows.seq)
                times.append(best_us(run, rounds, n=2) / layers)
        print(f"  {batch:>5} {ctx:>7} " + " ".join(f"{t:10.0f}" for t in times))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    if cpu_kernels() is None:
        raise SystemExit("the native CPU kernels did not build (no g++?); nothing to compare")
    load1, cores = os.getloadavg()[0], len(os.sched_getaffinity(0))
    print(f"load average {load1:.2f} on {cores} cores, {torch.get_num_threads()} threads"
          + ("  ** machine busy: figures are less reliable **" if load1 > 0.5 * cores else ""))
    dtype = getattr(torch, args.dtype)
    lora(dtype, args.rounds)
    attention(dtype, args.rounds)
    attention_cold(dtype, args.rounds)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
