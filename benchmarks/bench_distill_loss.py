"""Peak memory and time of one distillation step (forward + backward), full logits vs chunked.

A llama-style student (2 layers) and teacher (4 layers) with a 32k vocabulary on CPU, through the
`distill` task's `loss_sum` (forward KL, T = 2, alpha = 0.5). The full-logits step holds the student's
(B*T, V) float32 logits, their log-softmax and gradient plus the teacher's (B*T, V) logits; the
chunked step (`task: {name: distill, chunked_ce: N}`, `torchgraft.nn.kd_loss.chunked_distill_loss`)
holds `chunk x V` of each at a time. Peak bytes are torch's allocator accounting of the step
(`tools.memory.measure_peak_memory`; weights built outside the step are not counted). Also checks
that the loss and every gradient agree.

    python benchmarks/bench_distill_loss.py [--vocab 32000] [--batch 4] [--seq 256] [--chunk 256]
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch


def run(vocab: int = 32000, batch: int = 4, seq: int = 256, chunk: int = 256) -> dict[str, Any]:
    import torchgraft
    from torchgraft.tools.memory import measure_peak_memory
    from torchgraft.train.tasks import build_task

    torch.manual_seed(0)
    dims = {"name": "llama-tiny", "vocab_size": vocab, "n_embd": 256, "n_head": 4, "n_kv_head": 2,
            "intermediate_size": 688, "block_size": seq}
    student, teacher = torchgraft.build({**dims, "n_layer": 2}), torchgraft.build({**dims, "n_layer": 4})
    batch_ = {"input_ids": torch.randint(0, vocab, (batch, seq)), "labels": torch.randint(0, vocab, (batch, seq))}
    opts = {"name": "distill", "teacher": teacher, "loss": "forward_kl", "temperature": 2.0, "alpha": 0.5}
    results = {}
    for name, task in (("full", build_task(opts)), ("chunked", build_task({**opts, "chunked_ce": chunk}))):
        student.zero_grad(set_to_none=True)
        out = {}

        def step() -> None:
            loss = task.loss_sum(student, batch_)
            loss.backward()
            out["loss"] = loss.detach()

        t0 = time.perf_counter()
        peak = measure_peak_memory(step)
        results[name] = {"peak": peak, "loss": out["loss"], "s": time.perf_counter() - t0,
                         "grads": {n: p.grad.clone() for n, p in student.named_parameters()}}
    f, c = results["full"], results["chunked"]
    return {"benchmark": "distill_loss", "model": f"llama-style student L2 / teacher L4, C256, V{vocab}",
            "batch": batch, "seq": seq, "chunk": chunk,
            "full_peak_bytes": f["peak"], "chunked_peak_bytes": c["peak"], "peak_ratio": c["peak"] / f["peak"],
            "loss_rel_diff": float((f["loss"] - c["loss"]).abs() / f["loss"].abs()),
            "max_grad_abs_diff": max(float((f["grads"][n] - c["grads"][n]).abs().max()) for n in f["grads"]),
            "full_step_s": f["s"], "chunked_step_s": c["s"]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    r = run(a.vocab, a.batch, a.seq, a.chunk)
    if a.json:
        print(json.dumps(r))
        return r
    mib = 2**20
    print(f"distillation loss ({r['model']}, batch {r['batch']} x {r['seq']}, chunk {r['chunk']}):")
    print(f"  peak step memory: full logits {r['full_peak_bytes'] / mib:.0f} MiB, chunked "
          f"{r['chunked_peak_bytes'] / mib:.0f} MiB, ratio {r['peak_ratio']:.2f}x")
    print(f"  loss relative diff {r['loss_rel_diff']:.1e}, max |grad diff| {r['max_grad_abs_diff']:.1e}")
    print(f"  step time: full {r['full_step_s']:.2f}s, chunked {r['chunked_step_s']:.2f}s "
          f"(ratio {r['chunked_step_s'] / r['full_step_s']:.2f}x)")
    return r


if __name__ == "__main__":
    main()
