from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def llm():
    """The default model as served (the defaults: w4a8 where the CPU has a vector kernel)."""
    from tokenmill.llm import LLM

    return LLM(device="cpu", max_batch_total_tokens=16384)
