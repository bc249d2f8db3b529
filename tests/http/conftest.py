from __future__ import annotations

import pytest
from server_proc import ServerProcess


@pytest.fixture(scope="session")
def server():
    """The default model behind a real `tokenmill serve` (engine in its own process)."""
    s = ServerProcess("--max-concurrent-requests", "64", "--max-batch-size", "64")
    try:
        yield s.wait_ready()
    finally:
        s.stop()


@pytest.fixture(scope="session")
def offline():
    """The same model in-process, as the server runs it (the defaults: the GGUF's weights as
    w4a8 where the CPU has a vector kernel): what HTTP results must equal."""
    from tokenmill.llm import LLM

    return LLM(device="cpu", max_batch_total_tokens=16384)


@pytest.fixture(scope="session")
def keyed_server():
    s = ServerProcess("--api-key", "s3cret", "--max-batch-total-tokens", "2048",
                      "--cors-allow-origin", "https://app.example", "--json-output")
    try:
        yield s.wait_ready()
    finally:
        s.stop()
