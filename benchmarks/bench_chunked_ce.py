"""Peak memory of one training step (forward + backward) with plain vs chunked cross-entropy.

A llama-style model (RMSNorm, SwiGLU, GQA, RoPE, untied head) with a 128k vocabulary on CPU: the
plain step materialises the (B*T, V) float32 logits, their log-softmax and gradients; the chunked
step (the LM task with `chunked_ce: chunk`, i.e. `torchgraft.nn.losses.chunked_cross_entropy`)
holds `chunk x V` at a time. Both sides are the LM task's `loss_sum` (summed over tokens). Peak bytes are torch's own allocator accounting of the
step (`tools.memory.measure_peak_memory`; weights built outside the step are not counted, the
gradients it creates are). Also checks the loss and every gradient agree, and prints the memory
estimate (`tools.memory.estimate_memory`) for both.

    python benchmarks/bench_chunked_ce.py [--vocab 128256] [--batch 4] [--seq 256] [--chunk 256]
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch


def run(vocab: int = 128256, batch: int = 4, seq: int = 256, chunk: int = 256, n_layer: int = 2,
        n_embd: int = 256) -> dict[str, Any]:
    import torchgraft
    from torchgraft.tools.memory import estimate_memory, measure_peak_memory
    from torchgraft.train.tasks import build_task

    torch.manual_seed(0)
    model = torchgraft.build({"name": "llama-tiny", "vocab_size": vocab, "n_layer": n_layer, "n_embd": n_embd,
                              "n_head": 4, "n_kv_head": 2, "intermediate_size": 688, "block_size": seq})
    ids = torch.randint(0, vocab, (batch, seq))
    labels = torch.randint(0, vocab, (batch, seq))

    lm_batch = {"input_ids": ids, "labels": labels}
    plain_task, chunked_task = build_task("lm"), build_task({"name": "lm", "chunked_ce": chunk})

    def plain_loss() -> torch.Tensor:  # (B, T, V) float32 logits, log-softmax, gradients
        return plain_task.loss_sum(model, lm_batch)

    def chunked_loss() -> torch.Tensor:  # hidden states + the head weight, `chunk` rows at a time
        return chunked_task.loss_sum(model, lm_batch)

    results = {}
    for name, loss_fn in (("plain", plain_loss), ("chunked", chunked_loss)):
        model.zero_grad(set_to_none=True)
        out = {}

        def step() -> None:
            loss = loss_fn()
            loss.backward()
            out["loss"] = loss.detach()

        t0 = time.perf_counter()
        peak = measure_peak_memory(step)
        results[name] = {"peak": peak, "loss": out["loss"], "s": time.perf_counter() - t0,
                         "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}
    p, c = results["plain"], results["chunked"]
    loss_diff = float((p["loss"] - c["loss"]).abs() / p["loss"].abs())
    grad_diff = max(float((p["grads"][n] - c["grads"][n]).abs().max()) for n in p["grads"])
    est_plain = estimate_memory(model, batch=batch, seq_len=seq, activations="analytic")
    est_chunked = estimate_memory(model, batch=batch, seq_len=seq, activations="analytic", chunked_ce=chunk)
    return {"benchmark": "chunked_ce", "model": f"llama-style L{n_layer} C{n_embd} V{vocab}",
            "batch": batch, "seq": seq, "chunk": chunk,
            "plain_peak_bytes": p["peak"], "chunked_peak_bytes": c["peak"],
            "peak_ratio": c["peak"] / p["peak"], "loss_rel_diff": loss_diff, "max_grad_abs_diff": grad_diff,
            "plain_step_s": p["s"], "chunked_step_s": c["s"],
            "estimate_plain_activations": est_plain.activations,
            "estimate_chunked_activations": est_chunked.activations}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=128256)
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
    print(f"chunked cross-entropy ({r['model']}, batch {r['batch']} x {r['seq']}, chunk {r['chunk']}):")
    print(f"  peak step memory: plain {r['plain_peak_bytes'] / mib:.0f} MiB, chunked "
          f"{r['chunked_peak_bytes'] / mib:.0f} MiB, ratio {r['peak_ratio']:.2f}x (goal <= 0.5)")
    print(f"  loss relative diff {r['loss_rel_diff']:.1e}, max |grad diff| {r['max_grad_abs_diff']:.1e}")
    print(f"  step time: plain {r['plain_step_s']:.2f}s, chunked {r['chunked_step_s']:.2f}s")
    print(f"  estimate (activations): plain {r['estimate_plain_activations'] / mib:.0f} MiB, chunked "
          f"{r['estimate_chunked_activations'] / mib:.0f} MiB")
    return r


if __name__ == "__main__":
    main()
