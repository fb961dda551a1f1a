"""Decode threads follow the cores other processes leave free, and torch's own setting comes back."""
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from torchgraft import cpu_threads
from torchgraft.cpu_threads import DecodeThreads, available_cpus


def test_threads_are_the_free_cpus_capped_by_torch_and_restored(monkeypatch):
    before = torch.get_num_threads()
    free = {"n": 1}
    monkeypatch.setattr(cpu_threads, "free_cpus", lambda: free["n"])
    threads = DecodeThreads(max_threads=2, recheck_every=2)
    with threads as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    free["n"] = 8  # more free cores than torch was given: the user's setting stays the ceiling
    with threads as n:  # the second step reuses the first reading
        assert n == 1
    with threads as n:  # the third re-reads
        assert n == 2 and torch.get_num_threads() == 2
    assert torch.get_num_threads() == before
    monkeypatch.setattr(cpu_threads, "free_cpus", lambda: None)  # /proc unreadable: nothing changes
    assert DecodeThreads(max_threads=3).choose() == 3


def test_a_process_pinned_to_some_cpus_keeps_its_threads(monkeypatch):
    monkeypatch.setattr(cpu_threads, "available_cpus", lambda: 2)
    monkeypatch.setattr(cpu_threads.os, "cpu_count", lambda: 64)
    assert cpu_threads.free_cpus() is None  # the host's running count says nothing about our 2 CPUs


@pytest.mark.skipif(not Path("/proc/loadavg").exists(), reason="reads Linux /proc")
def test_a_busy_process_is_seen():
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # running by now
        seen = [cpu_threads._others_running() for _ in range(50)]
    finally:
        spin.kill()
        spin.wait()
    assert min(seen) >= 1  # the spinner is runnable at every reading
    free = cpu_threads.free_cpus()
    assert free is None or 1 <= free <= available_cpus()
