"""Start-up cost of the CLI: CPU seconds (user + sys) of `torchgraft --help`, a sub-command's `--help`
and a one-line config error, beside `python -c pass` and `python -c "import torch"`.

Each command runs in a fresh process; the commands alternate round by round and the median per
command is reported, with its ratio to `import torch` (the cost every command paid before).
Usage: python benchmarks/bench_startup.py [ROUNDS]
"""
from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu_seconds(argv: list[str], env: dict[str, str], cwd: Path = ROOT) -> tuple[float, int]:
    """(user + sys CPU seconds of the child, its exit code)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    rc = subprocess.call(argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), rc


def main(rounds: int = 5) -> int:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty.yaml"
        empty.write_text("")
        cases = {
            "python -c pass": [py, "-c", "pass"],
            'python -c "import torch"': [py, "-c", "import torch"],
            "torchgraft --help": [py, "-m", "torchgraft", "--help"],
            "torchgraft train --help": [py, "-m", "torchgraft", "train", "--help"],
            "torchgraft train EMPTY.yaml (error)": [py, "-m", "torchgraft", "train", str(empty),
                                                   "--out", str(Path(tmp) / "run")],
            "torchgraft train cfg trainer.max_step=1 (typo)": [py, "-m", "torchgraft", "train",
                                                               "configs/lenet-digits.yaml", "trainer.max_step=1",
                                                               "--out", str(Path(tmp) / "run")],
        }
        times: dict[str, list[float]] = {k: [] for k in cases}
        codes: dict[str, int] = {}
        for _ in range(rounds):
            for name, argv in cases.items():
                t, codes[name] = cpu_seconds(argv, env)
                times[name].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    torch_t = med['python -c "import torch"']
    print(f"CPU seconds (user + sys), median of {rounds} alternating rounds")
    print(f"{'command':50s} {'cpu s':>7s} {'x import torch':>15s} {'exit':>5s}")
    for name, t in med.items():
        print(f"{name:50s} {t:7.3f} {t / torch_t:15.2f} {codes[name]:5d}")
    slow = [k for k in cases if k.startswith("torchgraft") and med[k] >= 1.0]
    if slow:
        print(f"over 1 s of CPU: {', '.join(slow)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 5))
