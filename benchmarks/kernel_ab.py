"""Decode attention of two builds of the native kernels in one process: the sources at a git
revision (`--base`) against the working tree's, for the native CPU or another `-march`
(x86-64-v3: the AVX2 path), alternating the two libraries round by round; µs per call
(median of the rounds) and the ratio, with the largest difference of their outputs. Rows x
keys: 64 x 192 (a batched decode), 8 and 1 x 1,024, 1 x 4,096 and 2 x 8,192 (long contexts,
in 512-key chunks).

    .venv/bin/python benchmarks/kernel_ab.py --base HEAD~1 [--march x86-64-v3]
        [--cache float32|bfloat16|int8] [--rounds 6]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from tokenmill.kernels.cpu import FLAGS, SOURCES, CpuKernels
from tokenmill.layers import kv_int8
from tokenmill.layers.attention import TorchPagedAttention

ROOT = Path(__file__).resolve().parents[1]


def build(sources: list[Path], march: str, out: Path) -> CpuKernels:
    flags = [f"-march={march}" if f == "-march=native" else f for f in FLAGS]
    subprocess.run(["g++", *flags, "-o", str(out), *map(str, sources)], check=True)
    return CpuKernels(ctypes.CDLL(str(out)), out)


def base_sources(rev: str, into: Path) -> list[Path]:
    csrc = SOURCES[0].parent.relative_to(ROOT)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, str(csrc)],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return [into / csrc / s.name for s in SOURCES]


def call(k: CpuKernels, args: tuple[Any, ...]) -> torch.Tensor:
    return k.paged_decode(*args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="git revision of the other build")
    ap.add_argument("--march", default="native")
    ap.add_argument("--cache", default="float32", choices=["float32", "bfloat16", "int8"])
    ap.add_argument("--rounds", type=int, default=6)
    a = ap.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f}; -march={a.march}, {a.cache} cache")
    with tempfile.TemporaryDirectory() as tmp:
        libs = {a.base: build(base_sources(a.base, Path(tmp)), a.march, Path(tmp) / "base.so"),
                "tree": build(list(SOURCES), a.march, Path(tmp) / "tree.so")}
        hq, hk, d, bs = 9, 3, 64, 16
        gen = torch.Generator().manual_seed(0)
        for rows, ctx in ((64, 192), (8, 1024), (1, 1024), (1, 4096), (2, 8192)):
            per = -(-ctx // bs)
            perm = torch.randperm(rows * per, generator=gen)  # blocks scattered
            tables = [perm[i * per:(i + 1) * per].tolist() for i in range(rows)]
            meta = TorchPagedAttention().build_metadata([1] * rows, [ctx] * rows, tables, bs,
                                                        None, torch.device("cpu"))
            r = meta.rows
            assert r is not None
            n = rows * per
            if a.cache == "int8":
                cache = torch.zeros(2, hk, n, kv_int8.block_bytes(bs, d), dtype=torch.int8)
                kv_int8.write(cache, torch.randn(n * bs, hk, d, generator=gen),
                              torch.randn(n * bs, hk, d, generator=gen), torch.arange(n * bs))
                q = torch.randn(rows, hq, d, generator=gen)
            else:
                dt = getattr(torch, a.cache)
                cache = torch.randn(2, hk, n, bs, d, generator=gen).to(dt)
                q = torch.randn(rows, hq, d, generator=gen).to(dt)

            args = (q, cache, r.tables, r.bounds, r.max_keys, d ** -0.5, r.seq)
            outs = {name: call(k, args) for name, k in libs.items()}
            times: dict[str, list[float]] = {name: [] for name in libs}
            for i in range(a.rounds):
                for name in (list(libs) if i % 2 == 0 else list(libs)[::-1]):
                    t = time.perf_counter()
                    for _ in range(30):
                        call(libs[name], args)
                    times[name].append((time.perf_counter() - t) / 30)
            b, w = (statistics.median(times[x]) for x in libs)
            diff = (outs[a.base].float() - outs["tree"].float()).abs().max().item()
            print(f"{rows:3d} rows x {ctx:5d} keys: {a.base} {b * 1e6:7.0f} µs, working tree "
                  f"{w * 1e6:7.0f} µs: {b / w:.2f}x; outputs differ by {diff:.1e} at most",
                  flush=True)
    print(f"load average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
