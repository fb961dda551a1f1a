"""torchao's low-memory AdamW: `optim.name: adamw8bit | adamw4bit`.

Both moments are stored block-quantised (8-bit: blocks of 256, 4-bit: blocks of 128, with dynamic
quantisation maps), so the optimizer state is ~2 bytes (8-bit) or ~1 byte (4-bit) per trainable
parameter instead of 8. Tensors under 4096 values keep float32 moments (as bitsandbytes). Their
states are tensor subclasses, which torchgraft.checkpoint.subclass_tensors stores as plain tensors
so resume is exact. torchao compiles its per-parameter step with torch.compile on first use.
"""
from __future__ import annotations

from typing import Any

import torch

from torchgraft.errors import ConfigError
from torchgraft.train.config import OptimConfig

LOWBIT = ("adamw8bit", "adamw4bit")


def build_lowbit_adamw(groups: list[dict[str, Any]], cfg: OptimConfig) -> torch.optim.Optimizer:
    """torchao's AdamW8bit / AdamW4bit over `groups`, with the config's lr, betas, eps and decay."""
    try:
        from torchao.optim import AdamW4bit, AdamW8bit
    except ImportError:
        raise ConfigError(f"optim.name={cfg.name} needs torchao; install it with `pip install "
                          "'torchgraft[qlora]'` or use optim.name=adamw") from None
    cls = AdamW8bit if cfg.name == "adamw8bit" else AdamW4bit
    return cls(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
