"""benchmarks/step_stages.py (where an engine step's time goes) runs: a short run prints
every stage's ms per decode step, each stage within the step, and with --kernels the fused
stack's kernels, which sum to no more than the forward pass."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_step_stages_script_runs() -> None:
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_stages.py"),
                          "--prompts", "2", "--prompt-len", "8", "--new-tokens", "6",
                          "--repeats", "1", "--kernels"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("repeat 1: 2 x 6"))
    ms = {k: float(v) for k, v in re.findall(r"(\w+) (\d+\.\d+)", line)}
    assert set(ms) >= {"step", "schedule", "metadata", "forward", "lm_head", "sample",
                       "update", "detokenize", "python"}
    assert all(v >= 0 for v in ms.values())
    assert ms["forward"] + ms["lm_head"] + ms["python"] == pytest.approx(ms["step"], abs=2e-3)
    kernels = next((ln for ln in res.stdout.splitlines()
                    if ln.strip().startswith("fused stack, ms per decode step")), None)
    if "no fused stack" in res.stdout:
        return  # no C++ compiler here: the model runs layer by layer
    assert kernels is not None, res.stdout
    stages = dict(re.findall(r"(\w+) (\d+\.\d+)", kernels.split(":", 1)[1]))
    assert list(stages) == ["norm", "qkv", "rotary", "attention", "o", "norm2", "gate_up",
                            "silu_mul", "down", "total"]
    assert 0 < float(stages["total"]) <= ms["forward"] + 1e-3
