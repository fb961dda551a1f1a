"""A linear layer that is fast for the few rows of a decode step on CPU.

`F.linear(x, W)` computes `x @ Wᵀ`. With 1-8 rows (one token per sequence while generating) MKL
runs that as a matrix-vector product that streams the weight at about a third of the memory
bandwidth on the 2-core machine we measured (5-15 GB/s), while the same product in the other
orientation, `(W @ xᵀ)ᵀ` with at least two columns, runs at 20-34 GB/s
(`benchmarks/bench_generation.py` prints both). A decode step is bound by reading the weights,
so that orientation is the one used there. Inside `torch.compile` a single row is written as
a multiply-and-sum instead, which inductor emits as one vectorised, multi-threaded reduction that
streams the weight about twice as fast again (MKL's matrix-vector kernel runs on one thread).
Large inputs (training, prefill), other devices and dtypes, and graphs being exported keep
`F.linear`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from torchgraft.nn.compiled import in_inductor_graph

SMALL_ROWS = 8  # at and below this many rows the transposed product is faster (measured up to 16)


def _rows(x: torch.Tensor) -> int:
    return x.numel() // max(x.shape[-1], 1)


def _use_transposed(x: torch.Tensor, weight: torch.Tensor, rows: int) -> bool:
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if torch.compiler.is_exporting() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return False  # exported graphs stay plain linear ops (and shape-generic)
    return 0 < rows <= SMALL_ROWS


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`: (..., in) -> (..., out), equal up to float rounding."""
    rows = _rows(x)
    if not _use_transposed(x, weight, rows):
        return F.linear(x, weight, bias)
    if rows == 1 and in_inductor_graph():
        # inductor turns this into one vectorised reduction that streams the weight once
        y = (x.unsqueeze(-2) * weight).sum(-1)  # (..., 1, in) * (out, in) -> (..., out)
        return y if bias is None else y + bias
    x2 = x.reshape(rows, x.shape[-1])
    if rows == 1:  # one column would take the slow matrix-vector kernel again
        x2 = torch.cat([x2, x2])
    y = torch.mm(weight, x2.t()) if bias is None else torch.addmm(bias.unsqueeze(1), weight, x2.t())  # (out, cols)
    return y[:, :rows].t().contiguous().reshape(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, state-dict names and repr) whose forward is `linear` above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
