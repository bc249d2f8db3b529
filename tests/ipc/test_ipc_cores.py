"""Core placement: the API process keeps off the engine's cores on machines with 4 or more."""

from __future__ import annotations

import os
import subprocess
import sys

from tokenmill.engine.proc import ENGINE_CPUS_ENV, split_cores


def test_split_cores() -> None:
    assert split_cores({0, 1}) == ({0, 1}, {0, 1})  # too few to split: both share
    assert split_cores({0, 1, 2}) == ({0, 1, 2}, {0, 1, 2})
    assert split_cores({0, 1, 2, 3}) == ({3}, {0, 1, 2})
    api, engine = split_cores(set(range(16)))
    assert api == {14, 15} and engine == set(range(14))
    api, engine = split_cores({2, 5, 7, 9, 11})  # whatever cores the process may use
    assert api == {11} and engine == {2, 5, 7, 9}


def test_engine_takes_its_cores_and_sizes_its_threads_from_them() -> None:
    code = ("import os, torch; from tokenmill.engine.proc import _set_threads; _set_threads(); "
            "print(sorted(os.sched_getaffinity(0)), torch.get_num_threads())")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    first = min(os.sched_getaffinity(0))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**env, ENGINE_CPUS_ENV: str(first)}).stdout.split()
    assert out == [f"[{first}]", "1"]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**env, "OMP_NUM_THREADS": "1"}).stdout.split()
    assert out[-1] == "1"


def test_engine_cores_travel_in_the_child_environment_only() -> None:
    """The launcher hands the engine's share to the engine process's environment; its own
    environment is left as it was."""
    from tokenmill.frontend.mp_client import _child_env

    before = dict(os.environ)
    assert _child_env({3, 1, 2})[ENGINE_CPUS_ENV] == "1,2,3"
    assert _child_env(None).get(ENGINE_CPUS_ENV) == os.environ.get(ENGINE_CPUS_ENV)
    assert dict(os.environ) == before
