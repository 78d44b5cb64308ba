"""The malloc setting that keeps a hot loop's freed memory in the process (recsys_moe/allocator.py).

Process-wide and irreversible, so each check runs in a fresh interpreter."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

LOOP = """
import resource, sys
import torch
from recsys_moe.allocator import retain_freed_memory
applied = retain_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
# bytes: a step's mix of activations, and one block over glibc's largest adaptive mmap threshold
# (32 MiB), which it maps afresh, and faults in, every time
sizes = [2 << 20, 6 << 20, 3 << 20, 40 << 20, 1 << 20]
def step():
    held = [torch.empty(n // 4).fill_(1.0) for n in sizes]  # touched: each new page faults once
    del held
per_step = []
for _ in range(60):
    before = faults()
    step()
    per_step.append(faults() - before)
print(applied, sorted(per_step)[len(per_step) // 2])  # the median step: the heap may grow once
"""


def _run(env: dict[str, str]) -> tuple[bool, float]:
    out = subprocess.run(
        [sys.executable, "-c", LOOP], capture_output=True, text=True, check=True, env={**os.environ, **env}
    )
    applied, per_step = out.stdout.split()
    return applied == "True", float(per_step)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_freed_memory_is_reused_without_page_faults() -> None:
    applied, per_step = _run({})
    assert applied
    assert per_step < 5  # every block comes back from the heap


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_the_default_setting_leaves_glibc_alone() -> None:
    applied, per_step = _run({"RECSYS_MOE_MALLOC": "default"})
    assert not applied
    assert per_step > 5000  # glibc's own thresholds: the 40 MiB block is 10,240 fresh pages a step


def test_a_misspelt_setting_is_named_in_a_warning() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "from recsys_moe.allocator import retain_freed_memory; retain_freed_memory()"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "RECSYS_MOE_MALLOC": "defualt"},
    )
    assert "RECSYS_MOE_MALLOC='defualt': expected 'default'" in out.stderr
