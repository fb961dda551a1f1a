"""`make bench`: run every benchmarks/bench_*.py in its own process and report which failed.

Each benchmark prints its own table (ratios against a baseline measured in the same run):
bench_trainer (engine overhead), bench_gpt_step (engine vs a minimal GPT), bench_generation
(static-cache / compiled generate vs transformers, batch 1 and 4), bench_chunked_ce (peak memory,
plain vs chunked cross-entropy at V = 128k), bench_serve (`torchgraft serve`: 16 concurrent
streaming clients vs one at a time, TTFT / inter-token latency), bench_moe (the MoE block vs
transformers' Mixtral / Qwen3-MoE blocks), and any other bench_*.py. gpu_check.py is not a bench_* script:
it needs CUDA (run it on a GPU machine).
Usage: python benchmarks/run_all.py [--quick] [NAME_SUBSTRING ...]
(`--quick` is passed to the benchmarks that take it, e.g. bench_rl.py, whose full run takes ~30-40 min.)
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    here = Path(__file__).resolve().parent
    quick = "--quick" in argv
    argv = [a for a in argv if a != "--quick"]
    scripts = sorted(here.glob("bench_*.py"))
    if argv:
        scripts = [s for s in scripts if any(a in s.name for a in argv)]
    if not scripts:
        print("no benchmarks matched", file=sys.stderr)
        return 1
    failed = []
    for script in scripts:
        print(f"\n=== {script.name} ===", flush=True)
        t0 = time.perf_counter()
        extra = ["--quick"] if quick and "--quick" in script.read_text() else []
        rc = subprocess.call([sys.executable, str(script), *extra], cwd=here.parent)
        print(f"--- {script.name}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} in "
              f"{time.perf_counter() - t0:.0f}s", flush=True)
        if rc != 0:
            failed.append(script.name)
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
