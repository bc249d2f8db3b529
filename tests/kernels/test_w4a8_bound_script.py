"""benchmarks/w4a8_bound.py (what bounds the w4a8 tile loop) builds and runs: a short run
with the three variants' GMAC/s on each shape, or the plain message without VNNI."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="no C++ compiler")
def test_bound_script_runs() -> None:
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "w4a8_bound.py"),
                          "--reps", "2"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    if "no AVX-512 VNNI" in res.stdout:
        return
    rows = [ln for ln in res.stdout.splitlines() if ln.startswith("K=")]
    assert [r.split()[0] for r in rows] == ["K=576", "K=1536"]
    for r in rows:
        speeds = [float(x) for x in r.split()[2:5]]
        assert all(s > 0 for s in speeds), r
        assert re.search(r"int only \d+\.\d\dx the kernel", r), r
