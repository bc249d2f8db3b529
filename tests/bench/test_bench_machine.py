"""bench/machine.py: other processes' CPU and steal over a run, from /proc/stat and rusage."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tokenmill.bench.machine import CpuWatch, Sharing, own_cpu, proc_stat


class Fake:
    """Counters a test sets between start and result."""

    def __init__(self) -> None:
        self.busy, self.steal, self.own, self.t = 100.0, 5.0, 10.0, 0.0

    def watch(self) -> CpuWatch:
        return CpuWatch(lambda: (self.busy, self.steal), lambda: self.own, lambda: self.t)


def test_only_the_cpu_this_process_did_not_use_counts_as_others() -> None:
    f = Fake()
    w = f.watch()
    f.t, f.busy, f.own, f.steal = 10.0, 100.0 + 19.0, 10.0 + 16.0, 5.5  # 19 s busy, 16 ours
    s = w.result()
    assert s == Sharing(10.0, pytest.approx(0.3), pytest.approx(0.05))
    assert s.busy() and "0.30 cores" in s.describe() and "10 s run" in s.describe()


def test_a_quiet_run_is_not_busy_and_rounding_never_goes_negative() -> None:
    f = Fake()
    w = f.watch()
    f.t, f.busy, f.own = 10.0, 100.0 + 19.99, 10.0 + 20.0  # our rusage a tick ahead
    s = w.result()
    assert s is not None and s.others_cores == 0.0 and s.steal_cores == 0.0
    assert not s.busy()
    assert Sharing(10.0, 0.0, 0.3).busy()  # steal alone is enough


def test_no_proc_stat_gives_no_verdict(tmp_path: Path) -> None:
    assert proc_stat(str(tmp_path / "missing")) is None
    (tmp_path / "stat").write_text("intr 1 2 3\n")
    assert proc_stat(str(tmp_path / "stat")) is None
    assert CpuWatch(lambda: None, lambda: 0.0).result() is None


def test_proc_stat_fields(tmp_path: Path) -> None:
    import os
    tick = os.sysconf("SC_CLK_TCK")
    (tmp_path / "stat").write_text(f"cpu  {tick} 0 {tick} 999 7 0 0 {3 * tick} 0 0\ncpu0 1\n")
    assert proc_stat(str(tmp_path / "stat")) == (2.0, 3.0)  # idle and iowait are not busy


@pytest.mark.skipif(proc_stat() is None, reason="no /proc/stat")
def test_real_counters_see_our_own_work_as_ours() -> None:
    # Where a neighbour keeps the cores busy (a build, another test run), its work would be
    # indistinguishable from ours being miscounted: measure it first, while we sleep.
    idle = CpuWatch()
    time.sleep(0.3)
    before = idle.result()
    if before is not None and before.others_cores > 0.3:
        pytest.skip(f"other processes were using {before.others_cores:.2f} cores")
    w = CpuWatch()
    t0 = own_cpu()
    end = time.monotonic() + 0.4
    while time.monotonic() < end:
        pass
    # a child's CPU counts as ours once it has been waited for
    subprocess.run([sys.executable, "-c",
                    "import time\nt=time.monotonic()+0.4\nwhile time.monotonic()<t: pass"],
                   check=True)
    assert own_cpu() - t0 > 0.5
    s = w.result()
    assert s is not None and s.wall_s >= 0.8
    # ~0.8 s of our work over ~0.8 s: unless a neighbour was busy too, little is left over
    assert 0.0 <= s.others_cores < 1.0 and s.steal_cores >= 0.0
