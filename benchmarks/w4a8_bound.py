"""What bounds the w4a8 matmul on this CPU: its tile loop against the same loop with the
per-group float work removed (benchmarks/csrc/w4a8_bound.cpp), one thread, warm caches,
GMAC/s (multiply-accumulates of 8 activation rows by 16-row weight tiles).

The kernel does, per activation row and group of 32 weights, 8 vpdpbusd for the 512 integer
products and then float work: convert, s * d, and two FMAs (scale; the Q4_1 minimum's term).
On a core whose vpdpbusd and FMAs share the same two pipes (Zen 4), those float ops cost
what they take from the vpdpbusd: removing them shows how much of the loop they are.

    .venv/bin/python benchmarks/w4a8_bound.py [--reps 400]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from tokenmill.kernels.cpu import FLAGS

HERE = Path(__file__).resolve().parent


def build(out: Path) -> None:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise SystemExit("no C++ compiler (g++ or $CXX) on PATH")
    flags = [f for f in FLAGS if f not in ("-shared", "-fPIC")]
    subprocess.run([cxx, *flags, "-o", str(out), str(HERE / "csrc" / "w4a8_bound.cpp")],
                   check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=400)
    args = ap.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f}; one thread")
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "w4a8_bound"
        build(exe)
        out = subprocess.run([str(exe), str(args.reps)], check=True, capture_output=True,
                             text=True).stdout.strip().splitlines()
    if len(out) < 2:
        print("\n".join(out))
        return
    print(f"{'shape':<14} {'kernel':>8} {'no z':>8} {'int only':>9}   GMAC/s")
    for line in out[1:]:
        shape, full, no_z, int_only = line.split(",")
        f, nz, io = float(full), float(no_z), float(int_only)
        print(f"{shape:<14} {f:8.1f} {nz:8.1f} {io:9.1f}   no z {nz / f:.2f}x, "
              f"int only {io / f:.2f}x the kernel")


if __name__ == "__main__":
    main()
