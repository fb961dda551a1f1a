"""onnxruntime vs eager PyTorch on CPU, and int8 (dynamic quantisation) vs fp32.

For lenet, resnet18 (128x128 images), gpt-tiny and bert-tiny at batch 1 and 32: the model is exported
to ONNX (and an int8 copy), then eager PyTorch, onnxruntime fp32 and onnxruntime int8 are timed in
alternation (one call each per round, median of the rounds), one thread each. Printed: the medians
and the ratios eager / onnxruntime (> 1 = onnxruntime faster) and fp32 / int8 measured in the same run.
Accuracy: LeNet trained briefly on digits (fp32 eager vs onnxruntime fp32 vs int8 validation
accuracy), and for the transformers the max logit change and top-1 agreement of int8 against fp32.

    nice -n 10 python benchmarks/bench_export.py [--quick]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torchgraft  # noqa: E402
from torchgraft.interop.export import eager_module, export, ort_session  # noqa: E402

CASES = [  # (label, preset, overrides, batch sizes, image side / seq len)
    ("lenet", "lenet", {}, (1, 32), None),
    ("resnet18", "resnet18", {"num_classes": 10}, (1, 32), 128),
    ("gpt-tiny", "gpt-tiny", {}, (1, 32), 64),
    ("bert-tiny", "bert-tiny", {}, (1, 32), 64),
]


def _inputs(model, res, batch: int, size: int | None) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(batch)
    if res.input_names[0] == "images":
        c = model.config.in_chans
        side = size or model.config.image_size
        return (torch.randn(batch, c, side, side, generator=g),)
    ids = torch.randint(0, model.config.vocab_size, (batch, size), generator=g)
    return ids, torch.ones_like(ids)


def bench_latency(tmp: Path, rounds: int) -> list[dict]:
    rows = []
    for label, preset, ov, batches, size in CASES:
        model = torchgraft.build(preset, **ov).eval()
        if size and label.startswith("resnet"):
            example = (torch.randn(2, 3, size, size),)
        else:
            example = torchgraft.interop.export.example_inputs(model, 2, size or 8)
        res = export(model, example, format="onnx", path=tmp / f"{label}.onnx", quantize="int8")
        module = eager_module(model, res.kind, res.input_names).eval()
        fp32, int8 = ort_session(res.path, threads=1), ort_session(res.quantized_path, threads=1)
        for b in batches:
            x = _inputs(model, res, b, size)
            feed = {n: t.numpy() for n, t in zip(res.input_names, x)}

            def eager() -> float:
                t0 = time.perf_counter()
                with torch.inference_mode():
                    module(*x)
                return time.perf_counter() - t0

            def ort(sess) -> float:
                t0 = time.perf_counter()
                sess.run(None, feed)
                return time.perf_counter() - t0

            eager(), ort(fp32), ort(int8)  # warm-up
            te, tf, tq = [], [], []
            for _ in range(rounds):  # alternate so load changes hit all three alike
                te.append(eager())
                tf.append(ort(fp32))
                tq.append(ort(int8))
            me, mf, mq = (statistics.median(t) for t in (te, tf, tq))
            ratios_e = statistics.median(a / c for a, c in zip(te, tf))
            ratios_q = statistics.median(a / c for a, c in zip(tf, tq))
            rows.append(dict(model=label, batch=b, eager_ms=me * 1e3, ort_ms=mf * 1e3, int8_ms=mq * 1e3,
                             eager_over_ort=ratios_e, fp32_over_int8=ratios_q))
            print(f"{label:10s} b={b:<3d} eager {me * 1e3:8.2f} ms  ort {mf * 1e3:8.2f} ms  int8 {mq * 1e3:8.2f} ms"
                  f"  eager/ort {ratios_e:5.2f}x  fp32/int8 {ratios_q:5.2f}x", flush=True)
        if label in ("gpt-tiny", "bert-tiny"):
            x = _inputs(model, res, 32, size)
            feed = {n: t.numpy() for n, t in zip(res.input_names, x)}
            a, q = fp32.run(None, feed)[0], int8.run(None, feed)[0]
            top1 = float((a.argmax(-1) == q.argmax(-1)).mean())
            print(f"{label:10s} int8 vs fp32: max logit change {np.abs(a - q).max():.4f} "
                  f"(logit range {a.min():.2f}..{a.max():.2f}), top-1 agreement {top1:.4f}", flush=True)
    return rows


def bench_lenet_accuracy(tmp: Path, steps: int) -> None:
    from torchgraft.config import load_yaml
    from torchgraft.data import build_data
    from torchgraft.train import load_run_config, run_training

    cfg = load_yaml("configs/lenet-digits.yaml")
    cfg["trainer"] = {"max_steps": steps, "batch_size": 64, "seed": 0, "precision": "fp32"}
    run = run_training(load_run_config(cfg), tmp / "lenet-run")
    model = run.model.eval()
    val = build_data(load_run_config(cfg).data, 0).val
    xs = torch.stack([val[i]["inputs"] for i in range(len(val))])
    ys = torch.stack([val[i]["labels"] for i in range(len(val))])
    res = export(model, xs[:2], format="onnx", path=tmp / "lenet-digits.onnx", quantize="int8")
    with torch.inference_mode():
        eager = model(xs).argmax(-1)
    fp32 = ort_session(res.path, threads=1).run(None, {"images": xs.numpy()})[0]
    int8 = ort_session(res.quantized_path, threads=1).run(None, {"images": xs.numpy()})[0]
    acc = lambda pred: float((torch.as_tensor(pred) == ys).float().mean())  # noqa: E731
    print(f"lenet on digits ({steps} steps, {len(ys)} validation images): accuracy eager {acc(eager):.4f}, "
          f"onnxruntime fp32 {acc(fp32.argmax(-1)):.4f}, int8 {acc(int8.argmax(-1)):.4f}; "
          f"max logit change int8 {np.abs(fp32 - int8).max():.4f}; "
          f"file {res.path.stat().st_size / 1e6:.2f} MB -> {res.quantized_path.stat().st_size / 1e6:.2f} MB",
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer rounds and training steps")
    a = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        bench_latency(tmp, rounds=5 if a.quick else 15)
        bench_lenet_accuracy(tmp, steps=60 if a.quick else 200)


if __name__ == "__main__":
    main()
