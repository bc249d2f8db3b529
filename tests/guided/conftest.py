from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def llm():
    """The default model in float32 (what the constrained-generation tests decode with)."""
    from tokenmill.llm import LLM

    return LLM(dtype="float32", device="cpu", max_batch_total_tokens=16384)
