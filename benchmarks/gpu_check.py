"""GPU check: GPT-2 124M training steps with bf16 + torch.compile + FSDP2 on one CUDA device.

Prints the step time, tokens/s, achieved TFLOP/s and MFU against the device's peak bf16 dense
throughput (from a table of known devices; a measured bf16 matmul rate is shown alongside), and
the peak memory. Meant for the device tool (one H200), never for the test suite:

    python benchmarks/gpu_check.py                      # defaults: batch 16 x 1024 tokens, 20 steps
    python benchmarks/gpu_check.py --json $OUT/gpu_check.json --no-compile
    python benchmarks/gpu_check.py --generation-only    # only the generation part

Then the generation benchmark on the same device (`benchmarks/bench_generation.py` with
device cuda): GPT-2 124M shape, batch 1 and 4, torchgraft eager vs compiled (the static-cache
decode step under torch.compile mode "reduce-overhead", i.e. CUDA graphs) vs transformers'
`generate`, greedy outputs checked identical (`--no-generation` skips it).

On a machine without CUDA it prints "no CUDA device" and exits 0 (1 with --strict).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

# Fallback when torchgraft.train.mfu is missing: peak dense bf16 tensor-core FLOP/s (no sparsity)
# from the vendors' data sheets, matched against torch.cuda.get_device_name(); specific names first.
PEAK_BF16 = [
    ("GH200", 989.4e12),
    ("H200", 989.4e12),
    ("H100 PCIe", 756.0e12),
    ("H100 NVL", 835.0e12),
    ("H100", 989.4e12),       # SXM
    ("H800", 989.4e12),
    ("B200", 2250e12),
    ("A100", 312.0e12),
    ("A800", 312.0e12),
    ("L40S", 362.05e12),
    ("L4", 121.0e12),
    ("MI300X", 1307.4e12),
]


def peak_flops(name: str) -> float | None:
    """The known peak bf16 FLOP/s of a device name (the engine's table in torchgraft/train/mfu.py,
    else the copy above), or None when it is not known."""
    try:
        from torchgraft.train.mfu import peak_flops as engine_peak

        return engine_peak(name, "bf16")
    except ImportError:
        pass
    for key, value in PEAK_BF16:
        if key.lower() in name.lower():
            return value
    return None


# ---------------------------------------------------------------------------------------------
# GPT-2 124M: the zoo's preset when it exists, else a self-contained definition of the same model
# ---------------------------------------------------------------------------------------------

class _Block(nn.Module):
    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.h = h
        self.attn_norm = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.o_proj = nn.Linear(d, d)
        self.mlp_norm = nn.LayerNorm(d)
        self.fc_in = nn.Linear(d, 4 * d)
        self.fc_out = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).split(C, dim=-1)                   # (B, T, C) each
        q, k, v = (t.view(B, T, self.h, C // self.h).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)              # (B, H, T, hd)
        x = x + self.o_proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.fc_out(F.gelu(self.fc_in(self.mlp_norm(x)), approximate="tanh"))


class _GPT2(nn.Module):
    def __init__(self, vocab: int = 50257, block_size: int = 1024, n_layer: int = 12, n_head: int = 12,
                 n_embd: int = 768) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, n_embd)
        self.pos_emb = nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList(_Block(n_embd, n_head) for _ in range(n_layer))
        self.norm = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)
        self.lm_head.weight = self.tok_emb.weight

    def init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)                                 # (B, T, C)
        for blk in self.blocks:
            x = blk(x)
        return self.lm_head(self.norm(x))                                         # (B, T, V)


def build_gpt2(use_zoo: bool) -> tuple[nn.Module, str, dict]:
    """GPT-2 124M on the meta device; returns (model, where it came from, dims)."""
    if use_zoo:
        try:
            from torchgraft.models.registry import build

            model = build("gpt2", device="meta")
            c = model.config
            return model, "torchgraft zoo preset 'gpt2'", dict(
                n_layer=c.n_layer, n_embd=c.n_embd, block_size=c.block_size, vocab=c.vocab_size)
        except Exception as e:  # the zoo is optional for this check
            print(f"note: zoo preset 'gpt2' unavailable ({type(e).__name__}: {e}); using the built-in GPT-2")
    with torch.device("meta"):
        model = _GPT2()
    return model, "built-in GPT-2 definition", dict(n_layer=12, n_embd=768, block_size=1024, vocab=50257)


def flops_per_token(model: nn.Module, dims: dict, seq: int) -> tuple[int, float]:
    """(non-embedding-position params N, training FLOPs per token = 6N + 12 * L * C * T)."""
    seen, n = set(), 0
    for name, p in model.named_parameters():
        if id(p) in seen or "pos_emb" in name:
            continue
        seen.add(id(p))
        n += p.numel()
    return n, 6 * n + 12 * dims["n_layer"] * dims["n_embd"] * seq


def measured_matmul_peak(device: torch.device, n: int = 8192, reps: int = 20) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def run(args: argparse.Namespace) -> dict:
    from torchgraft.distributed import find_blocks, init_distributed, parallelize

    info = init_distributed("cuda", force=True)  # a one-process NCCL group: FSDP2 code paths on one GPU
    device = info.device
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(0)
    model, source, dims = build_gpt2(not args.builtin_model)
    n_params, fpt = flops_per_token(model, dims, args.seq)
    model = parallelize(model, "fsdp" if args.strategy == "fsdp" else "none", device=device,
                        mixed_precision="bf16" if args.strategy == "fsdp" else None,
                        activation_checkpointing=args.ac)
    compiled = False
    if args.compile:
        try:
            for _, blk in find_blocks(model):
                blk.compile()
            compiled = True
        except Exception as e:
            print(f"note: torch.compile failed ({type(e).__name__}: {e}); running eager")
    # foreach is the safe default for DTensor parameters; --fused tries the fused CUDA kernel
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, **({"fused": True} if args.fused else {"foreach": True}))

    vocab = dims["vocab"]
    x = torch.randint(0, vocab, (args.batch, args.seq + 1), device=device)
    inputs, targets = x[:, :-1], x[:, 1:]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.strategy != "fsdp")

    def step() -> torch.Tensor:
        with autocast:
            logits = model(inputs)
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    t_compile = time.perf_counter()
    for _ in range(args.warmup):
        loss = step()
    torch.cuda.synchronize()
    t_compile = time.perf_counter() - t_compile
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    tokens = args.batch * args.seq
    achieved = fpt * tokens / step_s
    name = torch.cuda.get_device_name(device)
    peak = peak_flops(name)
    measured = measured_matmul_peak(device)
    return {
        "device": name, "model": source, "params": n_params, "strategy": args.strategy,
        "mixed_precision": "bf16", "compile": compiled, "fused_adamw": args.fused, "activation_checkpointing": args.ac,
        "batch": args.batch, "seq": args.seq, "steps": args.steps,
        "warmup_s": round(t_compile, 2), "step_ms": round(step_s * 1e3, 2),
        "step_ms_min": round(min(times) * 1e3, 2), "tokens_per_s": round(tokens / step_s),
        "achieved_tflops": round(achieved / 1e12, 1),
        "peak_tflops": None if peak is None else round(peak / 1e12, 1),
        "mfu": None if peak is None else round(achieved / peak, 4),
        "measured_bf16_matmul_tflops": round(measured / 1e12, 1),
        "mfu_vs_measured_matmul": round(achieved / measured, 4),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2),
        "final_loss": round(float(loss), 4), "loss_finite": math.isfinite(float(loss)),
        "torch": torch.__version__,
    }


def run_generation(args: argparse.Namespace) -> dict:
    """bench_generation on CUDA: tokens/s of torchgraft eager / compiled (CUDA graphs) vs transformers."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_generation import run as bench_generation

    r = bench_generation(batches=(1, 4), prompt_len=args.gen_prompt, new_tokens=args.gen_tokens,
                         rounds=3, compile=args.compile, device="cuda")
    out = {}
    for c in r["cases"]:
        b = c["batch"]
        out[f"gen_b{b}_transformers_tok_s"] = round(c["transformers_tok_s"], 1)
        out[f"gen_b{b}_eager_tok_s"] = round(c["torchgraft_eager_tok_s"], 1)
        out[f"gen_b{b}_eager_ratio"] = round(c["ratio_eager"], 3)
        if "ratio_compiled" in c:
            out[f"gen_b{b}_cudagraph_tok_s"] = round(c["torchgraft_compiled_tok_s"], 1)
            out[f"gen_b{b}_cudagraph_ratio"] = round(c["ratio_compiled"], 3)
            out[f"gen_b{b}_compile_s"] = round(c["compile_s"], 1)
        out[f"gen_b{b}_greedy_identical"] = c["greedy_outputs_identical"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5, help="untimed steps (include compilation)")
    p.add_argument("--strategy", choices=["fsdp", "none"], default="fsdp")
    p.add_argument("--ac", default="none", help="activation checkpointing: none, full or k")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--fused", action="store_true", help="fused AdamW instead of foreach")
    p.add_argument("--builtin-model", action="store_true", help="skip the zoo's gpt2 preset")
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    p.add_argument("--strict", action="store_true", help="exit 1 when no CUDA device is present")
    p.add_argument("--no-generation", dest="generation", action="store_false",
                   help="skip the generation benchmark")
    p.add_argument("--generation-only", action="store_true", help="only the generation benchmark")
    p.add_argument("--gen-prompt", type=int, default=32, help="generation: prompt tokens")
    p.add_argument("--gen-tokens", type=int, default=128, help="generation: new tokens per row")
    args = p.parse_args(argv)

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch %s, cuda build: %s); nothing measured. "
              "Run it on a GPU machine (e.g. through the device tool)." % (torch.__version__, torch.version.cuda))
        return 1 if args.strict else 0
    result: dict = {}
    failed = False
    if not args.generation_only:
        try:
            result.update(run(args))
        except Exception:
            traceback.print_exc()
            print("gpu_check: training check FAILED (see the traceback above)")
            failed = True
        finally:
            from torchgraft.distributed import cleanup

            cleanup()
    if args.generation or args.generation_only:
        try:
            result.update(run_generation(args))
        except Exception:
            traceback.print_exc()
            print("gpu_check: generation check FAILED (see the traceback above)")
            failed = True
    width = max(len(k) for k in result)
    for k, v in result.items():
        print(f"{k:<{width}}  {v}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
