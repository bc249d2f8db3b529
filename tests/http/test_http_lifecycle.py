"""Process lifecycle: engine death and SIGTERM (checklist item 24), each on its own server."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

import httpx2 as httpx
from server_proc import ServerProcess


def test_engine_death_makes_server_unhealthy_and_exit_nonzero() -> None:
    s = ServerProcess("--max-batch-total-tokens", "2048").wait_ready()
    try:
        pid = s.engine_pid()
        assert pid and pid != s.proc.pid
        os.kill(pid, signal.SIGKILL)
        deadline = time.time() + 20
        health_failed = False  # a 503, or no answer at all once the server has gone
        while time.time() < deadline and not health_failed:
            try:
                health_failed = httpx.get(f"{s.url}/health", timeout=2).status_code == 503
            except httpx.HTTPError:
                health_failed = True
            time.sleep(0.05)
        assert health_failed
        assert s.proc.wait(timeout=30) != 0
        assert "engine" in s.output()
    finally:
        s.stop(signal.SIGKILL)


def test_sigterm_lets_running_stream_finish() -> None:
    s = ServerProcess("--max-batch-total-tokens", "4096",
                      "--graceful-termination-timeout", "60").wait_ready()
    try:
        events: list[dict] = []
        done = threading.Event()

        def consume() -> None:
            body = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 40}}
            with httpx.stream("POST", f"{s.url}/generate_stream", json=body, timeout=120) as r:
                import json

                for line in r.iter_lines():
                    if line.startswith("data:"):
                        events.append(json.loads(line[5:]))
            done.set()

        t = threading.Thread(target=consume)
        t.start()
        while len(events) < 3:
            time.sleep(0.05)
        s.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        # Draining: no new work is taken.
        with contextlib.suppress(httpx.HTTPError):  # a closed listener is "not ready" too
            assert httpx.get(f"{s.url}/health", timeout=2).status_code == 503
        assert done.wait(120)
        t.join()
        assert events[-1]["generated_text"] is not None  # the stream ran to its end
        assert len(events) == 40
        assert s.proc.wait(timeout=60) == 0
    finally:
        s.stop(signal.SIGKILL)
