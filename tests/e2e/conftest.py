from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    from tokenmill.loader import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def llm32():
    """The default model in float32 with a modest KV cache, shared by the e2e tests."""
    from tokenmill.llm import LLM

    return LLM(dtype="float32", device="cpu", max_batch_total_tokens=32768)
