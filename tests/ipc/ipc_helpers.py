"""Helpers shared by the ipc tests (imported as `ipc_helpers`; conftest puts this dir on sys.path)."""

from __future__ import annotations

import os
from pathlib import Path

from tokenmill.config import EngineConfig

# Small and deterministic: float32 on the CPU, a modest KV cache.
IPC_CONFIG = dict(dtype="float32", device="cpu", max_batch_total_tokens=8192)


def ipc_config(**overrides: object) -> EngineConfig:
    return EngineConfig.from_kwargs(**{**IPC_CONFIG, **overrides})


def engine_children() -> list[int]:
    """Pids of this process's `tokenmill.engine.proc` children that still exist (not zombies)."""
    me = str(os.getpid())
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        state, ppid = fields[0], fields[1]
        if ppid == me and state != "Z" and b"tokenmill.engine.proc" in cmd:
            found.append(int(d.name))
    return found
