"""scripts/device_check.sh, the GPU check a session runs on a lent device machine, rehearsed on
this CPU machine so that it works the first time it meets a GPU: the default model carried in
two halves is put back together and checked, the CUDA tests are collected and run (skipped
here), the benchmark's table and JSON come back; a missing or damaged half is reported and
only what needs the model is left out."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tokenmill.loader import default_model_path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "device_check.sh"
GPU_TEST_FILES = ["tests/models/test_model_parity.py", "tests/models/test_triton_attention.py",
                  "tests/lora/test_lora_triton.py", "tests/guided/test_guided_backend.py",
                  "tests/e2e/test_batching.py"]


def _devkit(tmp: Path, damage: str | None = None) -> Path:
    """The folder scripts/devkit.sh packs (without wheels: this Python has the packages)."""
    data = default_model_path().read_bytes()
    half = len(data) // 2
    kit = tmp / "devkit"
    (kit / "a").mkdir(parents=True)
    (kit / "b").mkdir()
    if damage != "missing":
        (kit / "a" / "model.part00").write_bytes(data[:half])
    second = bytearray(data[half:])
    if damage == "corrupt":
        second[1000] ^= 1
    (kit / "b" / "model.part01").write_bytes(bytes(second))
    return kit


def _run(tmp: Path, kit: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, DEVKIT=str(kit), DEVICE_CHECK_KIT=str(tmp / "machine"),
               OUT=str(tmp / "out"), DEVICE_CHECK_PYTHON=sys.executable,
               DEVICE_CHECK_ARGS="--device cpu --shapes smollm2 --concurrency 1,2 "
                                 "--new-tokens 2 --decode-tokens 4")
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True,
                          text=True, timeout=300)


def test_rehearsal_on_cpu(tmp_path: Path) -> None:
    kit = _devkit(tmp_path)
    assert _run(tmp_path, kit, "stash").returncode == 0  # the first call
    r = _run(tmp_path, kit)  # the second
    assert r.returncode == 0, r.stdout + r.stderr
    out = tmp_path / "out"
    log = (out / "check.log").read_text()
    assert "model ok" in log and "tests exit 0" in log and "gpu_decode exit 0" in log
    tests = (out / "gpu_tests.log").read_text()
    assert "skipped" in tests and "no CUDA device" in tests and "error" not in tests.lower()
    result = json.loads((out / "gpu.json").read_text())
    assert [r["shape"] for r in result["results"]] == ["smollm2"]
    assert "| smollm2 |" in (out / "gpu.md").read_text()


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_without_a_good_model_the_rest_still_runs(tmp_path: Path, damage: str) -> None:
    kit = _devkit(tmp_path, damage)
    _run(tmp_path, kit, "stash")
    r = _run(tmp_path, kit)
    out = tmp_path / "out"
    log = (out / "check.log").read_text()
    assert "model ok" not in log and "tests exit 0" in log, r.stdout + r.stderr
    assert ("first call's half is missing" if damage == "missing" else "sha256") in log
    assert "without the model: not test_cuda_engine_matches_cpu" in log
    assert not (out / "gpu.json").exists()
    assert not list((tmp_path / "machine" / "cache").glob("*.gguf"))


# Packages the device image lacks that scripts/devkit.sh does not carry (the server's): the
# engine, the CUDA tests and the GPU benchmark must not need them.
BLOCKER = """
import importlib.abc, runpy, sys
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {"fastapi", "starlette", "uvicorn", "orjson", "pydantic",
                                  "pydantic_core", "openai", "jsonschema", "matplotlib"}:
            raise ImportError("not on the device image: " + name)
sys.meta_path.insert(0, Blocker())
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def test_the_device_run_needs_no_server_packages(tmp_path: Path) -> None:
    """What device_check.sh runs imports nothing the device lacks beyond the carried wheels:
    the CUDA tests' files and `gpu_decode.py` (its smoke shape) under an import blocker."""
    shim = tmp_path / "blocker.py"
    shim.write_text(BLOCKER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT / "src"), str(ROOT / "tests"), str(ROOT / "benchmarks")]))
    collect = subprocess.run([sys.executable, str(shim), "pytest", "--collect-only", "-q",
                              "-m", "gpu", "-p", "no:cacheprovider", *GPU_TEST_FILES],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert collect.returncode == 0 and "error" not in collect.stdout.lower(), collect.stdout
    assert "test_cuda_engine_matches_cpu" in collect.stdout
    listed = set(re.findall(r"tests/\S+/test_\w+\.py", SCRIPT.read_text()))
    assert listed == set(GPU_TEST_FILES)
    bench = subprocess.run([sys.executable, str(shim), "gpu_decode", "--device", "cpu",
                            "--shapes", "tiny", "--concurrency", "1", "--new-tokens", "2",
                            "--decode-tokens", "3"], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=300)
    assert bench.returncode == 0 and "| tiny |" in bench.stdout, bench.stderr[-3000:]
