"""Engine overhead and achieved FLOP/s.

For each case, the torchgraft engine (`run_training`) and a hand-written PyTorch loop do the same
work in this process: same model and initial weights, same data (digits), same AdamW, same grad
clipping and precision. Step time is the median time between consecutive step ends in the middle of each run (setup, the
final evaluation and the final checkpoint are excluded); runs alternate, and the best of several
rounds is kept to damp noise from other processes. Also measured here: the machine's matmul peak in fp32 and bf16,
and the model FLOP/s each run achieves (FLOPs counted with torch's FlopCounterMode).

The headline ratio is the median over rounds of engine/plain measured back to back (robust to
load drift on a shared machine); the ratio of the best times is printed too.
Goal (issue 4): engine/plain <= 1.03 where compute dominates, <= 1.10 on the tiny MLP.
Usage: python benchmarks/bench_trainer.py [--quick] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from torchgraft.data import build_data
from torchgraft.train import Callback, run_training
from torchgraft.train.mfu import count_flops


def matmul_peak(dtype: torch.dtype, n: int = 1024, reps: int = 10) -> float:
    """Best FLOP/s of an n x n matmul in `dtype` (the machine's practical peak for that dtype)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def mlp(hidden: int, depth: int) -> nn.Module:
    layers, d = [nn.Flatten()], 32 * 32
    for _ in range(depth):
        layers += [nn.Linear(d, hidden), nn.ReLU()]
        d = hidden
    return nn.Sequential(*layers, nn.Linear(d, 10))


CASES = {
    # name: (model factory, batch size, precision, measured steps)
    "mlp-1024x2 b512 fp32": (lambda: mlp(1024, 2), 512, "fp32", 30),
    "mlp-1024x2 b512 bf16": (lambda: mlp(1024, 2), 512, "bf16", 30),
    "lenet b128 fp32": (lambda: __import__("torchgraft").build("lenet"), 128, "fp32", 15),
    "tiny-mlp-32 b32 fp32": (lambda: mlp(32, 1), 32, "fp32", 400),
}
WARMUP = 5


class StepClock(Callback):
    def __init__(self):
        self.times: list[float] = []

    def on_step_end(self, trainer, record):
        self.times.append(time.perf_counter())


def median_step(stamps: list[float]) -> float:
    """Median time between consecutive step ends: robust to spikes from other processes
    (the engine's periodic logging is still inside the steps it happens in)."""
    return statistics.median(b - a for a, b in zip(stamps, stamps[1:]))


def engine_step_time(make, init, batch, precision, steps, data, out) -> float:
    model = make()
    model.load_state_dict(init)
    clock = StepClock()
    cfg = {"model": {}, "data": {}, "optim": {"name": "adamw", "lr": 1e-3},
           "trainer": {"max_steps": WARMUP + steps + 1, "batch_size": batch, "precision": precision,
                       "grad_clip": 1.0},
           "logging": {"progress": False, "measure_flops": False, "every": 10}}
    run_training(cfg, out, model=model, data=data, callbacks=[clock])
    t = clock.times  # the last step also runs the final evaluation: leave it out
    return median_step(t[WARMUP - 1: WARMUP + steps])


def plain_step_time(make, init, batch, precision, steps, data) -> float:
    """What a user would write by hand: shuffled epochs, forward, loss, backward, clip, step."""
    model = make()
    model.load_state_dict(init)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)  # as the engine config
    x_all, y_all = data.train.tensors["inputs"], data.train.tensors["labels"]
    n = len(y_all)
    g = torch.Generator().manual_seed(0)
    perm, pos = torch.randperm(n, generator=g), 0
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    times = []
    for step in range(WARMUP + steps):
        if pos + batch > n:
            perm, pos = torch.randperm(n, generator=g), 0
        idx = perm[pos: pos + batch]
        pos += batch
        x, y = x_all[idx], y_all[idx]
        with amp:
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0:
            loss.item()
        times.append(time.perf_counter())
    return median_step(times[WARMUP - 1:])


def step_flops(make, batch, precision) -> int:
    model = make()
    x, y = torch.randn(batch, 1, 32, 32), torch.randint(0, 10, (batch,))

    def fwd_bwd():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
    return count_flops(fwd_bwd)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer rounds and steps")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    rounds = 1 if args.quick else args.rounds
    torch.manual_seed(0)
    print(f"threads: {torch.get_num_threads()}  torch {torch.__version__}")
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(f"measured matmul peak (1024^3): fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s, "
          f"bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s (bf16/fp32 = {peaks['bf16'] / peaks['fp32']:.2f}x)")
    data = build_data({"name": "digits"})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (make, batch, precision, steps) in CASES.items():
            steps = max(5, steps // 3) if args.quick else steps
            init = make().state_dict()
            eng, plain = [], []
            for r in range(rounds):
                plain.append(plain_step_time(make, init, batch, precision, steps, data))
                eng.append(engine_step_time(make, init, batch, precision, steps, data, Path(tmp) / f"{name}-{r}"))
            e, p = min(eng), min(plain)
            flops = step_flops(make, batch, precision)
            row = {"case": name, "engine_ms": e * 1e3, "plain_ms": p * 1e3, "ratio": e / p,
                   "ratio_median": statistics.median(a / b for a, b in zip(eng, plain)),
                   "engine_gflops": flops / e / 1e9, "plain_gflops": flops / p / 1e9,
                   "frac_of_peak": flops / e / peaks[precision]}
            rows.append(row)
            print(f"{name:24s} engine {row['engine_ms']:8.2f} ms/step  plain {row['plain_ms']:8.2f} ms/step  "
                  f"ratio {row['ratio_median']:.3f} (paired median; best-of {row['ratio']:.3f})  "
                  f"{row['engine_gflops']:7.1f} GFLOP/s = {100 * row['frac_of_peak']:5.1f}% of {precision} peak",
                  flush=True)
    if args.json:
        args.json.write_text(json.dumps({"peaks": peaks, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
