"""Weight-initialisation helpers shared by the model families."""
from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def normal_init_(module: nn.Module, std: float) -> None:
    """GPT-2/BERT scheme over every submodule: normal(0, std) Linear and Embedding weights, zero
    biases, and norms (LayerNorm, or anything with `eps` and `weight`) reset to ones/zeros.
    Modules declaring `normal_init = True` (stacked expert weights) get a normal(0, std) `weight`."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding) or getattr(m, "normal_init", False):
            nn.init.normal_(m.weight, 0.0, std)
        elif isinstance(m, nn.LayerNorm) or (hasattr(m, "eps") and hasattr(m, "weight")):
            m.reset_parameters()
