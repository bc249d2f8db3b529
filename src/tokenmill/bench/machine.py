"""Was the machine shared while a benchmark ran?

The load average after a run counts the benchmark's own threads (a 2-thread run leaves it
near 2 on 2 cores), so it cannot tell a quiet machine from a busy one. This compares the
machine's busy CPU time over the run (/proc/stat) with the time this process and its waited-for
children used (getrusage): the rest went to other processes. The steal column says how much
the hypervisor gave to other guests, where the kernel sees it. Neither sees every neighbour
(another guest's share of a core's caches and memory bandwidth is invisible), so a run with
no sharing seen can still be noisy: that is why only ratios from one run count.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass

Counters = tuple[float, float]  # (busy, steal) CPU seconds since boot


def proc_stat(path: str = "/proc/stat") -> Counters | None:
    """The machine's busy and stolen CPU seconds from the `cpu` line; None without one."""
    try:
        with open(path) as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 9:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / tick, steal / tick


def own_cpu() -> float:
    """CPU seconds of this process and of its children that have been waited for."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


@dataclass(frozen=True)
class Sharing:
    wall_s: float
    others_cores: float  # cores other processes used, on average over the run
    steal_cores: float  # cores the hypervisor gave to other guests, on average

    # A quarter of a core taken from a 2-core run moves its ratios by more than they differ.
    def busy(self, threshold: float = 0.25) -> bool:
        return self.others_cores > threshold or self.steal_cores > threshold

    def describe(self) -> str:
        return (f"other processes used {self.others_cores:.2f} cores and steal took "
                f"{self.steal_cores:.2f} on average over the {self.wall_s:.0f} s run")


class CpuWatch:
    """Started with the benchmark; `result()` at its end, after its child processes have
    been waited for (a child still running counts as another process)."""

    def __init__(self, stat: Callable[[], Counters | None] = proc_stat,
                 own: Callable[[], float] = own_cpu,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._stat, self._own, self._clock = stat, own, clock
        self._t0, self._c0, self._o0 = clock(), stat(), own()

    def result(self) -> Sharing | None:
        """None where the machine has no /proc/stat."""
        c1, o1, wall = self._stat(), self._own(), self._clock() - self._t0
        if self._c0 is None or c1 is None or wall <= 0:
            return None
        busy, steal = c1[0] - self._c0[0], c1[1] - self._c0[1]
        others = max(0.0, busy - (o1 - self._o0))  # tick rounding can make it slightly < 0
        return Sharing(wall, others / wall, max(0.0, steal) / wall)
