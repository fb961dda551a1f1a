"""benchmarks/contention.py: `--contend N` starts N busy processes and none outlives the benchmark,
whether it ends normally, raises, or is SIGKILLed."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))
from contention import contended  # noqa: E402


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"


def test_busy_processes_run_inside_and_stop_on_exit_and_on_error():
    with contended(2) as procs:
        assert len(procs) == 2 and all(p.poll() is None for p in procs)
        pids = [p.pid for p in procs]
    assert not any(_alive(pid) for pid in pids)
    with pytest.raises(RuntimeError), contended(1) as procs:
        pid = procs[0].pid
        raise RuntimeError("the benchmark failed")
    assert not _alive(pid)
    with contended(0) as procs:
        assert procs == []
    with pytest.raises(ValueError, match="--contend"), contended(-1):
        pass


def test_busy_processes_exit_when_the_benchmark_is_killed():
    code = ("import sys, time; sys.path.insert(0, %r)\nfrom contention import contended\n"
            "with contended(1) as p:\n    print(p[0].pid, flush=True)\n    time.sleep(60)\n" % str(BENCH))
    bench = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = int(bench.stdout.readline())
    assert _alive(child)
    bench.send_signal(signal.SIGKILL)
    bench.wait()
    deadline = time.time() + 10
    while _alive(child) and time.time() < deadline:
        time.sleep(0.05)
    assert not _alive(child)
