from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "http"))  # server_proc

from server_proc import ServerProcess


@pytest.fixture(scope="session")
def tm_server():
    """The default model behind a real `tokenmill serve`, for short bench runs."""
    s = ServerProcess("--max-concurrent-requests", "16", "--max-batch-size", "16")
    try:
        yield s.wait_ready()
    finally:
        s.stop()
