"""The engine process dying, failing to load, or losing its parent."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
from ipc_helpers import engine_children, ipc_config

from tokenmill.frontend.async_llm import EngineDeadError
from tokenmill.frontend.mp_client import EngineLoadError, EngineStartError, MPAsyncLLM
from tokenmill.loader import ModelLoadError
from tokenmill.protocol import SamplingParams

pytestmark = pytest.mark.slow


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_killed_engine_fails_open_streams_at_once() -> None:
    async def main() -> tuple[float, list[str], MPAsyncLLM]:
        engine = await MPAsyncLLM.start(ipc_config(), startup_timeout=120)
        dead: list[str] = []
        engine.on_dead = lambda: dead.append("dead")
        try:
            n = 0
            with pytest.raises(EngineDeadError, match="exited with code -9"):
                async for _ in engine.generate("Tell me a long story", SamplingParams(
                        max_new_tokens=2000, ignore_eos=True)):
                    n += 1
                    if n == 2:
                        os.kill(engine.pid, signal.SIGKILL)
                        t_kill = time.monotonic()
            elapsed = time.monotonic() - t_kill
            assert not engine.is_alive
            with pytest.raises(EngineDeadError):
                await engine.ping(1)
            with pytest.raises(EngineDeadError):
                async for _ in engine.generate("hi"):
                    pass
            return elapsed, dead, engine
        finally:
            await engine.shutdown()

    elapsed, dead, engine = asyncio.run(asyncio.wait_for(main(), 120))
    assert elapsed < 1.5, elapsed
    assert dead == ["dead"]  # once
    assert engine.returncode == -signal.SIGKILL and engine_children() == []


def test_model_that_fails_to_load(tmp_path: Path, ipc_default_gguf: Path) -> None:
    bad = tmp_path / "truncated.gguf"
    with open(ipc_default_gguf, "rb") as f:
        bad.write_bytes(f.read(1 << 20))
    before = set(Path(os.environ.get("TMPDIR", "/tmp")).glob("tokenmill-ipc-*"))
    t0 = time.monotonic()
    with pytest.raises(EngineLoadError) as info:
        asyncio.run(asyncio.wait_for(
            MPAsyncLLM.start(ipc_config(model_id=str(bad)), startup_timeout=60), 60))
    assert time.monotonic() - t0 < 15
    assert "truncated.gguf" in str(info.value) and "\n" not in str(info.value)
    assert isinstance(info.value, ModelLoadError) and isinstance(info.value, RuntimeError)
    assert engine_children() == []
    after = set(Path(os.environ.get("TMPDIR", "/tmp")).glob("tokenmill-ipc-*"))
    assert not (after - before)  # the socket dir is gone too


def test_engine_start_failures_are_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    from tokenmill.frontend import mp_client

    # A config the engine process rejects (its __post_init__ validation runs there): Fatal.
    real_encode = mp_client.msgspec.json.encode
    monkeypatch.setattr(mp_client.msgspec.json, "encode",
                        lambda obj: real_encode(obj).replace(b'"float32"', b'"float99"'))
    with pytest.raises(EngineStartError, match=r"invalid engine config.*float99"):
        asyncio.run(asyncio.wait_for(MPAsyncLLM.start(ipc_config(), startup_timeout=60), 60))
    monkeypatch.undo()
    assert engine_children() == []

    # A child that exits without a word.
    real_popen = subprocess.Popen

    def popen(cmd: list[str], **kw: Any) -> Any:
        return real_popen([sys.executable, "-c", "import sys; sys.exit(3)"], **kw)

    monkeypatch.setattr(mp_client.subprocess, "Popen", popen)
    with pytest.raises(EngineStartError, match="exited with code 3 before it was ready"):
        asyncio.run(asyncio.wait_for(MPAsyncLLM.start(ipc_config(), startup_timeout=60), 60))
    assert engine_children() == []


def test_engine_exits_when_its_parent_dies(tmp_path: Path) -> None:
    """An engine whose API process is SIGKILLed must not live on as an orphan, and removes
    the socket dir its parent can no longer remove."""
    sock_dir = tmp_path / "tokenmill-ipc-test"
    sock_dir.mkdir()
    code = (
        "import subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-m', 'tokenmill.engine.proc', '--config-json',"
        " sys.argv[1], '--input', sys.argv[2], '--output', sys.argv[3]])\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(60)\n")
    config = msgspec.json.encode(ipc_config()).decode()
    parent = subprocess.Popen([sys.executable, "-c", code, config, f"ipc://{sock_dir}/in",
                               f"ipc://{sock_dir}/out"], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        engine_pid = int(parent.stdout.readline())
        time.sleep(0.5)  # let it start (it is loading the model now)
        assert _alive(engine_pid)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 5
        while _alive(engine_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(engine_pid)
        assert not sock_dir.exists()
    finally:
        parent.kill()
