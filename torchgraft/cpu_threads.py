"""How many CPU threads a decode step should use: as many as there are cores nobody else is busy on.

A decode step is ~100 short parallel regions (one per op), each ending in a barrier that waits for
the slowest of torch's threads. On a machine where other processes keep some cores busy, the
threads placed on those cores run only part of the time, and every barrier waits for them: on
the 2-core machine with one busy process beside it, two threads decoded several times slower than
one (`benchmarks/bench_generation.py --contend 1`, docs/performance.md). So decoding uses
`free_cpus()` threads, re-read every few steps; with the machine to itself that is all of them.

`free_cpus()` = the CPUs this process may run on minus the threads of *other* processes that are
runnable right now (`/proc/loadavg`'s running count less this process's own running threads, the
median of a few readings). Where `/proc` is not there (not Linux), or the process may use only some
of the machine's CPUs (that count is machine-wide), nothing changes.
"""
from __future__ import annotations

import os
import statistics
from pathlib import Path
from types import TracebackType

import torch

_SAMPLES = 3


def _others_running() -> int | None:
    """Runnable threads of other processes now, or None where /proc cannot tell."""
    try:
        running = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
        own = 0
        for stat in Path("/proc/self/task").glob("*/stat"):
            try:
                own += stat.read_text().rsplit(")", 1)[1].split()[0] == "R"
            except (OSError, IndexError):
                continue  # a thread that just ended
    except (OSError, ValueError, IndexError):
        return None
    return max(0, running - own)


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def free_cpus() -> int | None:
    """CPUs not busy with other processes (at least 1), or None where that cannot be read: no
    /proc, or a process pinned to some of the machine's CPUs (the running count is machine-wide)."""
    if available_cpus() != (os.cpu_count() or 0):
        return None
    readings = [r for r in (_others_running() for _ in range(_SAMPLES)) if r is not None]
    if not readings:
        return None
    return max(1, available_cpus() - int(statistics.median(readings)))


class DecodeThreads:
    """Context of one decode step: torch runs it on `min(max_threads, free_cpus())` threads (re-read
    every `recheck_every` steps) and gets its own thread count back afterwards.

    `max_threads`: torch's thread count when this object was made (the user's `torch.set_num_threads`
    or OMP_NUM_THREADS stays the ceiling)."""

    def __init__(self, max_threads: int | None = None, recheck_every: int = 16):
        self.max_threads = max_threads or torch.get_num_threads()
        self.recheck_every = recheck_every
        self.threads = self.max_threads
        self._steps = 0
        self._saved: int | None = None

    def choose(self) -> int:
        """The thread count for the next steps (read now)."""
        free = free_cpus()
        self.threads = self.max_threads if free is None else min(self.max_threads, free)
        return self.threads

    def __enter__(self) -> int:
        if self._steps % self.recheck_every == 0:
            self.choose()
        self._steps += 1
        self._saved = torch.get_num_threads()
        if self.threads != self._saved:
            torch.set_num_threads(self.threads)
        return self.threads

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._saved is not None and torch.get_num_threads() != self._saved:
            torch.set_num_threads(self._saved)
        self._saved = None
