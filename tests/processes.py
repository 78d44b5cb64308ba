"""Servers the tests start as processes: wait until one answers, with its log when it does not."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable

import httpx


def wait_for_http(url: str, proc: subprocess.Popen, log: Callable[[], str], timeout: float = 120) -> None:
    """Poll `url` until it answers 200; fail with the end of `log()` if `proc` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"the server exited ({proc.returncode}):\n{log()[-4000:]}"
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"{url} did not answer within {timeout:.0f} s:\n{log()[-4000:]}"
        time.sleep(0.5)
