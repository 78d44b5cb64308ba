"""Thread counts that suit the host: the cores this process may use, less what other processes
keep busy, re-checked as they come and go; a chosen count is left alone."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from recsys_moe import threads
from recsys_moe.threads import THREADS_ENV, ThreadGovernor, available_cpus, fixed_threads


@pytest.fixture(autouse=True)
def _restore_torch_threads():  # type: ignore[no-untyped-def]
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_a_cpu_quota_caps_the_count(monkeypatch: pytest.MonkeyPatch) -> None:
    cores = len(threads._affinity())
    monkeypatch.setattr(threads, "_cgroup_quota", lambda: None)
    assert available_cpus() == cores
    monkeypatch.setattr(threads, "_cgroup_quota", lambda: 1.5)  # a Kubernetes limit of 1500m
    assert available_cpus() == 1
    monkeypatch.setattr(threads, "_cgroup_quota", lambda: 0.2)
    assert available_cpus() == 1  # never 0


def test_a_chosen_count_wins_and_a_bad_one_names_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(THREADS_ENV, raising=False)
    assert fixed_threads(None) is None and fixed_threads(3) == 3
    monkeypatch.setenv(THREADS_ENV, "2")
    assert fixed_threads(None) == 2 and fixed_threads(5) == 5
    governor = ThreadGovernor(interval=0)
    assert governor.fixed == 2 and torch.get_num_threads() == 2
    assert governor.tick() == 2
    monkeypatch.setenv(THREADS_ENV, "two")
    with pytest.raises(ValueError, match=THREADS_ENV):
        fixed_threads(None)


def _tick_until(governor: ThreadGovernor, want: int, seconds: float = 8.0) -> int:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.6)
        if governor.tick() == want:
            break
    return governor.threads


def test_threads_give_way_to_a_busy_neighbour_and_come_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(THREADS_ENV, raising=False)
    cores = available_cpus()
    if cores < 2 or len(threads._affinity()) != cores:
        pytest.skip("needs 2+ cores with no CPU quota below them")
    governor = ThreadGovernor(interval=0.5)
    assert governor.threads == cores == torch.get_num_threads()
    neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        assert _tick_until(governor, cores - 1) == cores - 1 == torch.get_num_threads()
    finally:
        neighbour.kill()
        neighbour.wait()
    assert _tick_until(governor, cores) == cores == torch.get_num_threads()
