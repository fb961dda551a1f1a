"""Linear layers of the model code: `nn.Linear` itself, and `TiedLinear` for an output head that
shares its weight with the input embedding.

Model code uses plain `nn.Linear` (`Linear` here is that class, kept for older imports). Faster CPU
forms of both (the few rows of a decode step) live in `torchgraft.nn.cpu_kernels` and are swapped
in by the `cpu-kernels` converter (`torchgraft.tools.cpu_kernels`), not chosen here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

Linear = nn.Linear


class TiedLinear(nn.Module):
    """`F.linear(x, weight)` with a weight another module owns (a tied output embedding):
    (..., in) -> (..., out). It holds no parameter, so state dicts do not change; it is a module so
    that converters can swap the product like any `nn.Linear`."""

    def forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight)
