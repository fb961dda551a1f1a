"""QLoRA memory and quantised inference, measured on CPU.

Training (default): a Llama-shaped model of ~1.1B parameters (TinyLlama's shape: 22 layers, 2048
wide, GQA 32/4, SwiGLU 5632, vocab 32000) with random bf16 weights is written once to a temporary
safetensors file; then each mode runs in its own subprocess, one after another, so each peak RSS is
that mode's alone: the model is built on meta and loaded layer by layer (`torchgraft.quant.load_quantized`;
QLoRA quantises each target linear to NF4 as it arrives), then a few training steps (batch 1,
short sequence, cross-entropy on random tokens) run. Modes: full bf16 fine-tune (AdamW, bf16
states), LoRA bf16 (rank 8 on every linear of the blocks), QLoRA (same adapters on an NF4 base),
QLoRA + torchao's AdamW8bit. Printed per mode: peak RSS (VmHWM, which includes the load), the
planner's estimate (`tools/finetune_memory.py`, plus the RSS measured after imports), their
ratio, seconds per step; and the goal ratio QLoRA / LoRA-bf16 peak.

    python benchmarks/bench_qlora.py                     # ~1.1B, 2 steps at seq 64 (needs ~10 GB for full FT)
    python benchmarks/bench_qlora.py --modes lora qlora  # a subset
    python benchmarks/bench_qlora.py --generate          # quantised inference instead (smaller model)

Inference (`--generate`): a 6-layer, 512-wide Llama in fp32 against the same model with NF4 and
int8 bases, and a QLoRA model merged back to bf16 (dequantise + merge): greedy decode with the
static KV cache, tokens/s and the largest logit change vs fp32 on the prompt (relative to the
largest fp32 logit).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

SHAPE = {"n_layer": 22, "n_embd": 2048, "n_head": 32, "n_kv_head": 4, "intermediate_size": 5632,
         "vocab_size": 32000, "block_size": 2048, "tie_embeddings": False}
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODES = {"full": ("full", "adamw"), "lora": ("lora", "adamw"), "qlora": ("qlora", "adamw"),
         "qlora8": ("qlora", "adamw8bit")}


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def make_weights(path: Path, shape: dict[str, Any]) -> int:
    """Random bf16 weights of the model, written one file (norm weights 1, others N(0, 0.02))."""
    import torchgraft
    from safetensors.torch import save_file

    model = torchgraft.build("llama-tiny", device="meta", **shape)
    g = torch.Generator().manual_seed(0)
    state = {}
    for n, p in model.named_parameters():
        state[n] = torch.ones(p.shape, dtype=torch.bfloat16) if p.ndim == 1 else \
            (torch.randn(p.shape, generator=g) * 0.02).to(torch.bfloat16)
    save_file(state, str(path))
    return sum(t.numel() for t in state.values())


def run_mode(mode: str, weights: Path, shape: dict[str, Any], steps: int, seq: int, rank: int) -> dict[str, Any]:
    """One mode in this process: load, `steps` training steps; peak RSS and the estimate."""
    import torch.nn.functional as F

    import torchgraft
    from torchgraft.peft import apply_lora
    from torchgraft.quant import load_quantized
    from torchgraft.quant.load import peak_rss_bytes
    from torchgraft.tools.finetune_memory import finetune_memory
    from torchgraft.train.config import OptimConfig
    from torchgraft.train.optim import build_optimizer

    method, optim = MODES[mode]
    if method == "qlora" or optim != "adamw":
        import torchao.optim  # noqa: F401  (its import is part of the runtime, not of the model)
        import torchao.quantization  # noqa: F401
    base_rss = _rss()
    model = torchgraft.build("llama-tiny", device="meta", **shape)
    estimate = finetune_memory(torchgraft.build("llama-tiny", device="meta", **shape), method, optim, 1, seq,
                               rank=rank, targets=ALL, runtime_bytes=base_rss)
    t0 = time.perf_counter()
    load = load_quantized(model, weights, "nf4", ALL if method == "qlora" else [], dtype=torch.bfloat16)
    load_s = time.perf_counter() - t0
    load_peak = peak_rss_bytes()
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        apply_lora(model, ALL, rank=rank, alpha=2 * rank)
    opt = build_optimizer(model, OptimConfig(name=optim, lr=1e-4))
    g = torch.Generator().manual_seed(0)
    times = []
    losses = []
    for _ in range(steps):
        ids = torch.randint(0, shape["vocab_size"], (1, seq + 1), generator=g)
        t0 = time.perf_counter()
        logits = model(ids[:, :-1])  # (1, T, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    return {"mode": mode, "method": method, "optimizer": optim, "peak_rss": peak_rss_bytes(),
            "load_peak_rss": load_peak, "runtime_rss": base_rss, "load_s": load_s,
            "quantized_layers": len(load.quantized), "step_s": times, "losses": losses,
            "estimate": estimate.to_dict()}


def train_benchmark(a: argparse.Namespace) -> dict[str, Any]:
    shape = {**SHAPE, "n_layer": a.n_layer}
    out: dict[str, Any] = {"shape": shape, "seq": a.seq, "steps": a.steps, "rank": a.rank, "modes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "model.safetensors"
        out["params"] = make_weights(weights, shape)
        print(f"Llama-shaped model: {out['params'] / 1e9:.3f}B parameters, bf16 weights {weights.stat().st_size / 2**30:.2f} GiB; "
              f"batch 1 x seq {a.seq}, {a.steps} steps, LoRA rank {a.rank} on {', '.join(ALL)}", flush=True)
        for mode in a.modes:
            cmd = [sys.executable, __file__, "--child", mode, "--weights", str(weights), "--n-layer", str(a.n_layer),
                   "--steps", str(a.steps), "--seq", str(a.seq), "--rank", str(a.rank)]
            res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
            line = [l for l in res.stdout.splitlines() if l.startswith("{")]
            if res.returncode or not line:
                print(f"{mode}: failed (exit {res.returncode}): {res.stderr.strip().splitlines()[-1:]}", flush=True)
                continue
            r = json.loads(line[-1])
            out["modes"][mode] = r
            est = r["estimate"]["total"]
            print(f"{mode:<7} peak RSS {r['peak_rss'] / 2**30:6.2f} GiB  estimate {est / 2**30:6.2f} GiB  "
                  f"(estimate/measured {est / r['peak_rss']:.3f})  load {r['load_s']:.0f} s, peak during load "
                  f"{r['load_peak_rss'] / 2**30:.2f} GiB  step {min(r['step_s']):.1f} s  loss {r['losses'][-1]:.3f}",
                  flush=True)
    m = out["modes"]
    if "qlora" in m and "lora" in m:
        out["qlora_over_lora"] = m["qlora"]["peak_rss"] / m["lora"]["peak_rss"]
        print(f"QLoRA / LoRA-bf16 peak RSS: {out['qlora_over_lora']:.3f} (goal <= 0.45)")
    if "qlora8" in m and "lora" in m:
        print(f"QLoRA+adamw8bit / LoRA-bf16 peak RSS: {m['qlora8']['peak_rss'] / m['lora']['peak_rss']:.3f}")
    return out


@torch.inference_mode()
def generate_benchmark(a: argparse.Namespace) -> dict[str, Any]:
    import torchgraft
    from torchgraft.generation import iter_tokens
    from torchgraft.peft import apply_lora, unload
    from torchgraft.quant import dequantize_model, quantize_linears

    shape = {"n_layer": 6, "n_embd": 512, "n_head": 8, "n_kv_head": 4, "intermediate_size": 1536,
             "vocab_size": 4096, "block_size": 512}

    def fresh() -> torch.nn.Module:
        torch.manual_seed(0)
        return torchgraft.build("llama-tiny", **shape).eval()

    ids = torch.randint(0, shape["vocab_size"], (1, 32), generator=torch.Generator().manual_seed(1))
    ref_logits = fresh()(ids)
    models = {"fp32": fresh()}
    for fmt in ("nf4", "int8"):
        m = fresh()
        quantize_linears(m, fmt, ALL)
        models[fmt] = m
    merged = fresh()
    apply_lora(merged, ALL, rank=8, quantize_base="nf4")
    with torch.no_grad():
        for n, p in merged.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01, generator=torch.Generator().manual_seed(2))
    dequantize_model(merged, torch.bfloat16)
    unload(merged, merge=True).to(torch.bfloat16)  # the whole merged model in bf16
    models["merged-bf16"] = merged
    out = {}
    for name, m in models.items():
        change = float((m(ids).float() - ref_logits).abs().max() / ref_logits.abs().max())
        list(iter_tokens(m, ids, max_new_tokens=4, cache="static"))  # warm-up
        t0 = time.perf_counter()
        toks = list(iter_tokens(m, ids, max_new_tokens=a.new_tokens, cache="static"))
        dt = time.perf_counter() - t0
        out[name] = {"tokens_per_s": len(toks) / dt, "max_logit_change": change}
        print(f"{name:<12} {len(toks) / dt:7.1f} tokens/s  max |logit - fp32| / max |fp32 logit| = {change:.3e}",
              flush=True)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--n-layer", type=int, default=SHAPE["n_layer"])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--generate", action="store_true", help="quantised inference instead of training memory")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--child", choices=list(MODES), help=argparse.SUPPRESS)
    p.add_argument("--weights", help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print one JSON line at the end")
    a = p.parse_args(argv)
    if a.child:
        r = run_mode(a.child, Path(a.weights), {**SHAPE, "n_layer": a.n_layer}, a.steps, a.seq, a.rank)
        print(json.dumps(r))
        return r
    r = generate_benchmark(a) if a.generate else train_benchmark(a)
    if a.json:
        print(json.dumps(r))
    return r


if __name__ == "__main__":
    main()
