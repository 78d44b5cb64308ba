"""How many CPU threads torch should use here, now.

torch's default is one thread per core of the machine, which is wrong twice over on the hosts the
platform runs on. In a container the process may own fewer cores than the machine has (its
affinity mask, a cgroup CPU quota). And on a shared host (an Airflow worker, a serving host, a
laptop running a build) another busy process makes every OpenMP barrier wait for a thread that
is not scheduled: measured here, a 2-thread training run on 2 cores next to one CPU-bound
neighbour fell from 174k to 48k samples/s, while 1 thread kept 124k
(`benchmarks/results/threads.md`).

So the default is a `ThreadGovernor`: at most the CPUs this process may use (`available_cpus`),
minus what other processes have been using on them lately (`/proc/stat` less our own CPU time),
re-checked every couple of seconds at a step boundary. A fixed count (`RECSYS_MOE_THREADS`, or a
command's own setting such as `train.threads`) turns it off.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

THREADS_ENV = "RECSYS_MOE_THREADS"


def _cgroup_quota() -> float | None:
    """The CPU quota of this process's cgroup in cores (v2 `cpu.max`, v1 `cpu.cfs_quota_us`), or None."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return quota_us / period_us if quota_us > 0 else None
    except (OSError, ValueError):
        return None


def _affinity() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return set(range(os.cpu_count() or 1))


def available_cpus() -> int:
    """The cores this process may use: its affinity mask, capped by its cgroup's CPU quota."""
    cpus = len(_affinity())
    quota = _cgroup_quota()
    if quota is not None:
        cpus = min(cpus, max(1, math.floor(quota)))
    return max(1, cpus)


def fixed_threads(explicit: int | None = None) -> int | None:
    """A thread count someone chose: `explicit` (a command's setting), else $RECSYS_MOE_THREADS."""
    if explicit:
        return explicit
    value = os.environ.get(THREADS_ENV, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{THREADS_ENV}={value!r}: expected a whole number of threads ≥ 1")
    return int(value)


def _busy_ticks(cpus: set[int]) -> tuple[int, int] | None:
    """(busy, total) clock ticks so far, summed over `cpus`, from /proc/stat; None where absent."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    busy = total = 0
    for line in lines:
        head, _, rest = line.partition(" ")
        if head.startswith("cpu") and head[3:].isdigit() and int(head[3:]) in cpus:
            fields = [int(x) for x in rest.split()]
            idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
            busy += sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal
            total += sum(fields[:8])
    return (busy, total) if total else None


class ThreadGovernor:
    """Sets torch's intra-op threads to what this host can give now; `tick()` at step boundaries.

    `fixed`: a chosen count, set once and never changed. Otherwise `first` seconds after the start
    and every `interval` seconds after that, the count becomes the cores we may use minus the cores
    other processes kept busy since the last check (rounded, at least 1).
    """

    def __init__(self, fixed: int | None = None, interval: float = 2.0, first: float = 0.5) -> None:
        import torch

        self._torch = torch
        self.fixed = fixed_threads(fixed)
        self.interval = interval
        self._wait = min(first, interval)  # the first look comes soon: a neighbour may be there from the start
        self.limit = available_cpus()
        self._cpus = _affinity()
        self._last: tuple[float, float, tuple[int, int] | None] | None = None
        self.threads = self.fixed or self.limit
        torch.set_num_threads(self.threads)
        if self.fixed is None:
            self._last = self._sample()

    def _sample(self) -> tuple[float, float, tuple[int, int] | None]:
        return time.monotonic(), time.process_time(), _busy_ticks(self._cpus)

    def others_busy(self, before: tuple[float, float, tuple[int, int] | None]) -> float | None:
        """Cores other processes kept busy since `before` (None where /proc/stat is absent)."""
        now = self._sample()
        self._last = now
        if before[2] is None or now[2] is None:
            return None
        busy, total = now[2][0] - before[2][0], now[2][1] - before[2][1]
        wall = now[0] - before[0]
        if total <= 0 or wall <= 0:
            return None
        cores_busy = len(self._cpus) * busy / total
        ours = (now[1] - before[1]) / wall
        return max(0.0, cores_busy - ours)

    def tick(self) -> int:
        """Re-check the host if `interval` has passed; the thread count in force."""
        if self.fixed is not None or self._last is None or time.monotonic() - self._last[0] < self._wait:
            return self.threads
        self._wait = self.interval
        others = self.others_busy(self._last)
        if others is None:
            return self.threads
        free = len(self._cpus) - others
        wanted = int(min(self.limit, max(1, math.floor(free + 0.5))))
        if wanted != self.threads:
            log.info("torch threads %d → %d (other processes keep %.1f cores busy)", self.threads, wanted, others)
            self.threads = wanted
            self._torch.set_num_threads(wanted)
        return self.threads
