"""SIGTERM as an exception, so a stopped job ends like an interrupted one; and a child that ends
with its parent.

Python's default for SIGTERM (what `kill`, Airflow, Kubernetes and torchrun send) ends the process
on the spot: no `finally`, no `with` exit, so an MLflow run stays RUNNING forever. Raised as
`Terminated` (a KeyboardInterrupt) where the process was, every block unwinds: the tracker ends
the run KILLED, writes in progress are discarded whole (`recsys_moe.atomic`), and the last
checkpoint stays as it was, ready for `--resume`.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM."""


def _raise(signum: int, frame: FrameType | None) -> None:
    raise Terminated(f"stopped by signal {signal.Signals(signum).name}")


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises `Terminated` (the previous handler comes back after)."""
    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """Linux: have the kernel send `signum` to this process when its parent dies.

    A torchrun agent whose launcher was SIGKILLed, or a rank whose agent was, otherwise runs on
    alone: nothing supervises it any more, and on a multi-node run its peers train on beside a
    node whose launcher already reported a failure. With this the whole node's share of the run
    stops (as `Terminated`, so it unwinds), the other nodes' ranks fail on their next collective,
    and `--resume` continues from the last checkpoint. Elsewhere a no-op. The kernel watches the
    *thread* that started this process, so start it from one that outlives it (a main thread)."""
    if sys.platform != "linux":
        return
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    except (OSError, AttributeError) as exc:
        log.warning("cannot tie this process to its parent (%s): it would outlive a killed launcher", exc)
        return
    if os.getppid() != parent:  # the parent died before the kernel was told
        os.kill(os.getpid(), signum)
