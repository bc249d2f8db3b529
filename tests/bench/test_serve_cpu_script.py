"""benchmarks/serve_cpu.py (CPU per served token of the API and engine processes): its /proc
reader agrees with getrusage, and a short run against a real server prints a row per level
with every figure positive."""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

linux = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")


@linux
def test_cpu_seconds_reads_this_process() -> None:
    from serve_cpu import cpu_seconds

    before = cpu_seconds(os.getpid())
    x = 0
    while cpu_seconds(os.getpid()) - before < 0.2:  # busy until /proc shows 0.2 s more
        x += 1
    usage = resource.getrusage(resource.RUSAGE_SELF)
    # /proc counts in clock ticks; getrusage is finer: they agree within a few ticks
    assert abs(cpu_seconds(os.getpid()) - (usage.ru_utime + usage.ru_stime)) < 0.1


@linux
@pytest.mark.slow
def test_serve_cpu_script_runs() -> None:
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serve_cpu.py"),
                          "--concurrency", "1,2", "--requests", "2", "--prompt-tokens", "8",
                          "--output-tokens", "4"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = re.findall(r"^\| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$",
                      res.stdout, re.M)
    assert [r[0] for r in rows] == ["1", "2"], res.stdout
    for _, tok_s, itl, api, engine in rows:
        assert float(tok_s) > 0 and float(itl) >= 0
        assert float(api) > 0 and float(engine) > 0
