"""Fine-tuning memory planner: full / LoRA / QLoRA with adamw / adamw8bit / adamw4bit, activation
checkpointing and chunked cross-entropy, and "does it fit in N GiB" with the cheapest settings.

    torchgraft inspect llama3-8b --finetune qlora --optim adamw8bit --seq 2048 --fit 24GiB

Per part, in bytes (bf16 weights and adapters, as torchtune's recipes):
- weights     frozen or trained: 2 per parameter; a QLoRA target linear in NF4: 1/2 per weight + 1/64
              (int8 block scale) + 2/(64*256) (per-256-scales factor); int8 base: 1 + 2 per output row
- adapters    rank * (in + out) per target linear, bf16
- gradients   2 per trainable parameter (full: all, LoRA/QLoRA: adapters)
- optimizer   adamw: 2 states x 2 bytes (torch keeps them in the parameter's dtype); adamw8bit:
              2 x (1 + 4/256) bytes; adamw4bit: 2 x (1/2 + 4/128); tensors under 4096 values keep
              2 bf16 states (torchao, as bitsandbytes)
- activations the transformer formula of `tools.memory.analytic_activations` (bf16), with
              checkpointing and chunked CE as configured
- transient   the largest target weight dequantised in backward: NF4 16 bytes per weight (torchao's
              two int64 index arrays of numel/2, two bf16 halves, the bf16 result and its transposed
              copy), int8 6; nothing for LoRA / full FT
- runtime     what the process holds before the model (Python, torch): given by the caller
              (benchmarks pass the RSS measured after imports), default 0
benchmarks/bench_qlora.py prints this estimate beside the measured peak RSS of each mode.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from torchgraft.errors import ConfigError
from torchgraft.tools.memory import analytic_activations

METHODS = ("full", "lora", "qlora")
OPTIMIZERS = ("adamw", "adamw8bit", "adamw4bit", "sgd")
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_STATE_BYTES = {"adamw": 4.0, "adamw8bit": 2 * (1 + 4 / 256), "adamw4bit": 2 * (0.5 + 4 / 128), "sgd": 0.0}
_SIZE = re.compile(r"^\s*([0-9.]+)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """'24GiB' / '16 GB' / '1e9' -> bytes."""
    m = _SIZE.match(str(text))
    if not m:
        raise ConfigError(f"cannot read memory size {text!r}; write e.g. 24GiB or 16GB")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "b").lower()])


def nf4_bytes(numel: int) -> float:
    return numel / 2 + numel / 64 + 2 * numel / (64 * 256)


@dataclass
class FinetuneMemory:
    method: str
    optimizer: str
    activation_checkpointing: bool
    chunked_ce: int | None
    weights: int
    adapters: int
    gradients: int
    optimizer_state: int
    activations: int
    transient: int
    runtime: int

    @property
    def total(self) -> int:
        return (self.weights + self.adapters + self.gradients + self.optimizer_state + self.activations
                + self.transient + self.runtime)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total}

    def settings(self) -> str:
        return (f"--finetune {self.method} --optim {self.optimizer}"
                + (" --checkpointing" if self.activation_checkpointing else "")
                + (f" --chunked-ce {self.chunked_ce}" if self.chunked_ce else ""))


def _targets(model: nn.Module, targets: list[str]) -> dict[str, nn.Linear]:
    from torchgraft.peft.lora import target_matches

    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and any(target_matches(n, t) for t in targets)}


def finetune_memory(model: nn.Module, method: str = "qlora", optimizer: str = "adamw", batch: int = 1,
                    seq_len: int | None = None, *, rank: int = 8, targets: list[str] | None = None,
                    activation_checkpointing: bool = False, chunked_ce: int | None = None,
                    base: str = "nf4", runtime_bytes: int = 0) -> FinetuneMemory:
    """The estimate for `model` (any device, meta included) fine-tuned with these settings."""
    if method not in METHODS:
        raise ConfigError(f"unknown fine-tune method {method!r}; choose from {', '.join(METHODS)}")
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
    layers = _targets(model, targets or ALL_LINEAR) if method != "full" else {}
    if method != "full" and not layers:
        raise ConfigError(f"{method}: no nn.Linear layer matches the targets {targets or ALL_LINEAR}")
    quant_ids = {id(m.weight) for m in layers.values()} if method == "qlora" else set()
    seen: set[int] = set()
    weights = 0.0
    sizes = []
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in quant_ids:
            weights += nf4_bytes(p.numel()) if base == "nf4" else p.numel() + 2 * p.shape[0]
        else:
            weights += 2 * p.numel()
        sizes.append(p.numel())
    adapter_sizes = [s for m in layers.values() for s in (rank * m.in_features, rank * m.out_features)]
    trainable = sizes if method == "full" else adapter_sizes
    n_train = sum(trainable)
    state = sum(s * (_STATE_BYTES[optimizer] if s >= 4096 or optimizer in ("adamw", "sgd") else 4.0)
                for s in trainable)
    cfg = getattr(model, "config", None)
    seq = seq_len or getattr(cfg, "block_size", None) or 128
    gated = any(hasattr(m, "gate_proj") for m in model.modules())
    act = analytic_activations(cfg, batch, seq, 2, activation_checkpointing, gated,
                               lm=hasattr(model, "lm_head"), chunked_ce=chunked_ce) or 0
    biggest = max((m.weight.numel() for m in layers.values()), default=0)
    transient = biggest * (16 if base == "nf4" else 6) if method == "qlora" else 0
    return FinetuneMemory(method, optimizer, bool(activation_checkpointing), chunked_ce, int(weights),
                          2 * sum(adapter_sizes), 2 * n_train, int(state), int(act), int(transient),
                          int(runtime_bytes))


def plan_fit(model: nn.Module, budget: int, method: str = "qlora", optimizer: str = "adamw", **kw: Any
             ) -> tuple[FinetuneMemory | None, list[FinetuneMemory]]:
    """(the first setting that fits `budget` bytes, all tried), trying the least intrusive first:
    the asked setting, chunked CE, then 8-bit and 4-bit AdamW, then activation checkpointing, and
    (if the asked method does not fit) the cheaper methods lora then qlora."""
    tried: list[FinetuneMemory] = []
    methods = [method] + [m for m in METHODS[METHODS.index(method) + 1:]]
    optims = [optimizer] + [o for o in ("adamw8bit", "adamw4bit") if o != optimizer and optimizer != "sgd"]
    for m in methods:
        for ac in (False, True):
            for o in optims:
                for ce in (None, 1024):
                    est = finetune_memory(model, m, o, activation_checkpointing=ac, chunked_ce=ce, **kw)
                    tried.append(est)
                    if est.total <= budget:
                        return est, tried
    return None, tried


def inspect_finetune(spec: str, overrides: dict[str, Any], method: str, optimizer: str, batch: int,
                     seq_len: int | None, fit: str | None = None, rank: int = 8,
                     activation_checkpointing: bool = False, chunked_ce: int | None = None) -> dict[str, Any]:
    """What `torchgraft inspect MODEL --finetune ...` prints: the estimate and, with `fit`, the
    cheapest settings that fit (or None). The model is built on the meta device."""
    from torchgraft.models.registry import build

    model = build(spec, device="meta", **overrides)
    optimizer = "adamw" if optimizer == "adam" else optimizer
    est = finetune_memory(model, method, optimizer, batch, seq_len, rank=rank,
                          activation_checkpointing=activation_checkpointing, chunked_ce=chunked_ce)
    out: dict[str, Any] = {"model": spec, "batch": batch, "seq_len": seq_len, "estimate": est.to_dict()}
    if fit is not None:
        budget = parse_size(fit)
        best, _ = plan_fit(model, budget, method, optimizer, batch=batch, seq_len=seq_len, rank=rank)
        out["fit"] = {"budget": budget, "fits": est.total <= budget,
                      "cheapest": None if best is None else {"settings": best.settings(), **best.to_dict()}}
    return out


def format_finetune(report: dict[str, Any]) -> str:
    """Plain-text lines of an `inspect_finetune` report."""
    from torchgraft.tools.meta import format_bytes

    e = report["estimate"]
    lines = [f"fine-tune memory of {report['model']} ({e['method']}, {e['optimizer']}, batch {report['batch']}"
             f"{', seq ' + str(report['seq_len']) if report['seq_len'] else ''})"]
    for k in ("weights", "adapters", "gradients", "optimizer_state", "activations", "transient", "total"):
        lines.append(f"  {k:<16}{format_bytes(e[k]):>12}")
    if "fit" in report:
        f = report["fit"]
        verdict = "fits" if f["fits"] else "does not fit"
        lines.append(f"as asked it {verdict} in {format_bytes(f['budget'])}")
        c = f["cheapest"]
        lines.append(f"cheapest settings that fit: {c['settings']} ({format_bytes(c['total'])})" if c else
                     "no setting fits: use a smaller model, a shorter --seq or more memory")
    return "\n".join(lines)
