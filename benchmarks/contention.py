"""`--contend N` for the speed benchmarks: N busy processes beside the measurement, as on a loaded
machine, started and always stopped by the benchmark itself.

    with contended(n):   # n = 0: nothing is started
        measure()

Each busy process spins in pure Python (one core each) and exits on its own within milliseconds
if the benchmark dies without cleaning up (it watches its parent's pid), so none outlives a run.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator

_SPIN = """
import os
while os.getppid() == {parent}:  # the benchmark's pid, fixed before this process even starts
    for _ in range(100_000):
        pass
"""


@contextlib.contextmanager
def contended(n: int) -> Iterator[list[subprocess.Popen]]:
    """Run the body with `n` busy processes; they are stopped (terminate, then kill) on any exit."""
    if n < 0:
        raise ValueError(f"--contend must be >= 0, got {n}")
    procs: list[subprocess.Popen] = []
    spin = [sys.executable, "-c", _SPIN.format(parent=os.getpid())]
    try:
        for _ in range(n):
            procs.append(subprocess.Popen(spin, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
        yield procs
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def add_argument(parser) -> None:  # noqa: ANN001 - an argparse.ArgumentParser
    """The shared `--contend N` option."""
    parser.add_argument("--contend", type=int, default=0, metavar="N",
                        help="run N busy processes beside the measurement (a loaded machine); 0 = quiet")
