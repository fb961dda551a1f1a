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
    """`F.linear(x, embedding.weight)`: the output head of a model whose head shares the input
    embedding's weight, (..., dim) -> (..., vocab). It holds no parameter (state dicts do not
    change) and takes the embedding module at each call (not its weight: a weight passed as a
    forward input would be a leaf input that autograd-hooking tools such as FLOP counters refuse,
    and a stored reference would go stale when the embedding is replaced). It is a module so that
    converters can swap the product like any `nn.Linear`."""

    def forward(self, x: torch.Tensor, embedding: nn.Embedding) -> torch.Tensor:
        return F.linear(x, embedding.weight)
