"""Run some tests of a file in a child pytest with extra environment: triton's interpreter
must be chosen before triton is imported, and its compiler is best kept out of the suite's
process. The child must pass and skip nothing (else it ran the wrong tests)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_pytest_child(test_file: str, args: list[str], env: dict[str, str],
                     drop: tuple[str, ...] = ()) -> None:
    full = {k: v for k, v in os.environ.items() if k not in drop} | env
    cmd = [sys.executable, "-m", "pytest", test_file, "-q", "-p", "no:cacheprovider", *args]
    res = subprocess.run(cmd, env=full, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    assert " passed" in res.stdout and " skipped" not in res.stdout, res.stdout[-2000:]


def run_ptx_child(test_file: str, keyword: str) -> None:
    """A file's sm90 compilation tests (`-k keyword`), in a child: triton's compiler leaks
    nanobind objects and says so when the interpreter exits, which would end this run's
    output."""
    run_pytest_child(test_file, ["-k", keyword], {"TOKENMILL_PTX_CHILD": "1"},
                     drop=("TRITON_INTERPRET",))
