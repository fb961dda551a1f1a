"""CPU cost of `torchgraft inspect PRESET` for every preset: CPU seconds (user + sys) beyond
`python -c "import torch"`, with the cost of `import torch._dynamo` beside it for scale: inspect
runs one meta pass and no longer imports it (under torch 2.13 dispatch modes, Python meta kernels,
meta-device initialisers and FakeTensorMode all did; see tools/meta.py). Goal: < 2 s beyond
`import torch` per preset. Each command runs in a fresh process; baselines are the median of ROUNDS.

Usage: python benchmarks/bench_inspect.py [--rounds N] [--root TREE] [PRESET ...]
(`--root`: measure another checkout, e.g. the previous commit, with the same interpreter.)
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

from bench_startup import cpu_seconds  # the script's folder is on sys.path

GOAL_S = 2.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the baselines (presets run once each)")
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    ap.add_argument("presets", nargs="*")
    a = ap.parse_args(argv)
    root = a.root.resolve()
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    py = sys.executable
    presets = a.presets or subprocess.run(
        [py, "-c", "from torchgraft.models.registry import list_models; print(*list_models())"],
        env=env, cwd=root, capture_output=True, text=True, check=True).stdout.split()

    def cpu(argv: list[str]) -> tuple[float, int]:
        return cpu_seconds(argv, env, cwd=root)

    torch_s = statistics.median(cpu([py, "-c", "import torch"])[0] for _ in range(a.rounds))
    dynamo_s = statistics.median(cpu([py, "-c", "import torch, torch._dynamo"])[0] for _ in range(a.rounds))
    print(f"tree: {root}")
    print(f"import torch: {torch_s:.2f} s CPU; import torch._dynamo on top: {dynamo_s - torch_s:.2f} s "
          f"(median of {a.rounds}; other jobs may share the CPU)")
    print(f"{'preset':18s} {'cpu s':>7s} {'beyond torch':>13s} {'exit':>5s}")
    over = []
    for name in presets:
        t, rc = cpu([py, "-m", "torchgraft", "inspect", name])
        beyond = t - torch_s
        print(f"{name:18s} {t:7.2f} {beyond:13.2f} {rc:5d}", flush=True)
        if rc != 0 or beyond >= GOAL_S:
            over.append(name)
    if over:
        print(f"over {GOAL_S:.0f} s beyond import torch (or failed): {', '.join(over)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
