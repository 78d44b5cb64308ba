"""SIGTERM as an exception, so a stopped job ends like an interrupted one.

Python's default for SIGTERM (what `kill`, Airflow, Kubernetes and torchrun send) ends the process
on the spot: no `finally`, no `with` exit, so an MLflow run stays RUNNING forever. Raised as
`Terminated` (a KeyboardInterrupt) where the process was, every block unwinds: the tracker ends
the run KILLED, writes in progress are discarded whole (`recsys_moe.atomic`), and the last
checkpoint stays as it was, ready for `--resume`.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType


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
