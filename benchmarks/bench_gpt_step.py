"""Training-step speed: torchgraft's engine on its GPT vs a minimal GPT with every standard trick.

Same shapes on both sides: a character-level GPT (4 layers, 4 heads, 128 wide, block 64, the
built-in corpus through the char tokenizer), batch 12 x 64 tokens, AdamW (lr 1e-3, weight decay
0.1 on matrices), grad clipping at 1.0, fp32.

- ours: `torchgraft.train.run_training` with model `gpt-tiny` resized to those shapes and the data
  `text` (char) dataset: the real engine (sampler, collate, task loss, clipping, schedule, logging);
  `trainer.compile` on or off (`--compile`, default: both when the machine has a compiler).
- reference: a minimal GPT written below in the style of nanoGPT with the usual tricks: one fused
  QKV projection, `F.scaled_dot_product_attention(is_causal=True)`, tied head, foreach AdamW, a
  hand-written loop over random windows of the same token stream, `.item()` only at log time.

The two alternate step by step: after each engine step a callback runs one reference step, so
load drifts on a shared machine hit both alike. Per round, the ratio is the median reference step
time / the median engine step time (engine time: from the end of the callback to the end of the
next step, so it includes the engine's own per-step work); the headline is the median over rounds
(> 1: ours is faster). Goal (issue 14): >= 1.05. Compile time falls in the warm-up steps.

    python benchmarks/bench_gpt_step.py [--rounds 5] [--steps 40] [--compile {on,off,both}]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from contention import add_argument as add_contend_argument, contended  # benchmarks/contention.py
import torch.nn.functional as F
from torch import nn

N_LAYER, N_HEAD, N_EMBD, BLOCK, BATCH = 4, 4, 128, 64, 12
LR, WEIGHT_DECAY, WARMUP = 1e-3, 0.1, 5


# ---- the reference: a minimal GPT with the standard tricks ------------------------------------------
class RefBlock(nn.Module):
    def __init__(self, c: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln_1 = nn.LayerNorm(c)
        self.c_attn = nn.Linear(c, 3 * c)  # fused QKV
        self.c_proj = nn.Linear(c, c)
        self.ln_2 = nn.LayerNorm(c)
        self.c_fc = nn.Linear(c, 4 * c)
        self.mlp_proj = nn.Linear(4 * c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class RefGPT(nn.Module):
    def __init__(self, vocab: int, n_layer: int = N_LAYER, n_head: int = N_HEAD, c: int = N_EMBD,
                 block: int = BLOCK):
        super().__init__()
        self.wte = nn.Embedding(vocab, c)
        self.wpe = nn.Embedding(block, c)
        self.h = nn.ModuleList(RefBlock(c, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(c)
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith(("c_proj.weight", "mlp_proj.weight")):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        for block in self.h:
            x = block(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)  # tied head
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))


def reference_stepper(tokens: torch.Tensor, vocab: int):
    """A function running one training step of the reference (model, AdamW, its own batches)."""
    torch.manual_seed(0)
    model = RefGPT(vocab)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                             {"params": other, "weight_decay": 0.0}], lr=LR, betas=(0.9, 0.99), foreach=True)
    g = torch.Generator().manual_seed(0)
    count = [0]

    def step() -> None:
        ix = torch.randint(len(tokens) - BLOCK - 1, (BATCH,), generator=g)
        x = torch.stack([tokens[i: i + BLOCK] for i in ix])
        y = torch.stack([tokens[i + 1: i + 1 + BLOCK] for i in ix])
        loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if count[0] % 10 == 0:
            loss.item()
        count[0] += 1
    return step


# ---- ours: the engine ----------------------------------------------------------------------------
def engine_config(steps: int, compile: bool, adamw: str = "fused") -> dict[str, Any]:
    """The run config of "ours"; `adamw="loop"` is PyTorch's per-tensor AdamW (the engine's default
    before fused AdamW), `"fused"` the engine's default."""
    return {
        "model": {"name": "gpt-tiny", "n_layer": N_LAYER, "n_head": N_HEAD, "n_embd": N_EMBD, "block_size": BLOCK},
        "data": {"name": "text", "source": "builtin", "tokenizer": "char", "seq_len": BLOCK, "val_fraction": 0.01},
        "optim": {"name": "adamw", "lr": LR, "weight_decay": WEIGHT_DECAY, "betas": [0.9, 0.99],
                  **({"foreach": False} if adamw == "loop" else {})},
        "schedule": {"name": "constant"},
        "trainer": {"max_steps": WARMUP + steps + 1, "batch_size": BATCH, "precision": "fp32",
                    "grad_clip": 1.0, "compile": compile},
        "eval": {"every": 0, "max_batches": 1},
        "checkpoint": {"every": 0, "save_best": False},
        "logging": {"every": 10, "progress": False, "tensorboard": False, "measure_flops": False},
    }


def interleaved_step_times(steps: int, compile: bool, data: Any, out: Path, ref_step,
                           adamw: str = "fused") -> tuple[list[float], list[float]]:
    """Run the engine; after each of its steps run one reference step (inside a callback), so
    both are measured back to back all along. Returns (engine step times, reference step times)."""
    from torchgraft.train import Callback, run_training

    class Interleave(Callback):
        def __init__(self):
            self.engine: list[float] = []
            self.ref: list[float] = []
            self.last: float | None = None

        def on_step_end(self, trainer, record):  # noqa: ANN001
            now = time.perf_counter()
            if self.last is not None:  # from the end of the previous callback to this step's end
                self.engine.append(now - self.last)
            t0 = time.perf_counter()
            ref_step()
            self.ref.append(time.perf_counter() - t0)
            self.last = time.perf_counter()

    clock = Interleave()
    torch.manual_seed(0)
    run_training(engine_config(steps, compile, adamw), out, data=data, callbacks=[clock])
    # drop the warm-up steps (and compilation) and the last step (it also evaluates and saves)
    return clock.engine[WARMUP:-1], clock.ref[WARMUP + 1:-1]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--compile", choices=["on", "off", "both"], default="both")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--adamw", choices=["fused", "loop"], default="fused",
                    help="our optimizer path (loop = per-tensor AdamW, the engine before issue 14)")
    ap.add_argument("--json", action="store_true")
    add_contend_argument(ap)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from torchgraft.data import build_data

    cfg = engine_config(a.steps, False)
    data = build_data(cfg["data"], 0)
    tokens = torch.cat([data.train[i]["input_ids"] for i in range(len(data.train))])  # the windows, end to end
    vocab = data.info["vocab_size"]
    variants = {"on": [True], "off": [False], "both": [False, True]}[a.compile]
    ref_step = reference_stepper(tokens, vocab)
    times: dict[str, list[float]] = {"reference": []}
    ratios: dict[bool, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp, contended(a.contend):
        for r in range(a.rounds):
            for c in variants:
                eng, ref = interleaved_step_times(a.steps, c, data, Path(tmp) / f"{c}-{r}", ref_step, a.adamw)
                times.setdefault(f"ours_compile_{c}", []).extend(eng)
                times["reference"].extend(ref)
                ratios.setdefault(c, []).append(statistics.median(ref) / statistics.median(eng))
    tok = BATCH * BLOCK
    result: dict[str, Any] = {"benchmark": "gpt_step", "threads": torch.get_num_threads(), "contend": a.contend,
                              "shape": f"L{N_LAYER} H{N_HEAD} C{N_EMBD} V{vocab}, batch {BATCH} x {BLOCK}",
                              "reference_tok_s": tok / statistics.median(times["reference"])}
    for c in variants:
        key = f"ours_compile_{c}"
        result[f"{key}_tok_s"] = tok / statistics.median(times[key])
        result[f"ratio_compile_{c}"] = statistics.median(ratios[c])
        result[f"ratio_compile_{c}_rounds"] = ratios[c]
    if a.json:
        print(json.dumps(result))
        return result
    print(f"gpt step ({result['shape']}, {result['threads']} threads, {a.contend} busy processes beside it, "
          f"median of {a.rounds} alternating rounds):")
    print(f"  reference (minimal GPT, fused QKV, SDPA, tied head, foreach AdamW): "
          f"{result['reference_tok_s']:.0f} tok/s")
    for c in variants:
        print(f"  torchgraft engine ({a.adamw} AdamW), compile={c}: {result[f'ours_compile_{c}_tok_s']:.0f} tok/s, "
              f"ours/reference {result[f'ratio_compile_{c}']:.3f}x (rounds {min(ratios[c]):.3f}-{max(ratios[c]):.3f}; "
              f"goal >= 1.05)")
    return result


if __name__ == "__main__":
    main()
