"""Fixtures for the ipc tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# Helper modules next to the tests (ipc_helpers), whatever pytest's import mode.
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def ipc_default_gguf() -> Path:
    from tokenmill.loader import default_model_path

    return default_model_path()
