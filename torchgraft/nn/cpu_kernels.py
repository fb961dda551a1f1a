"""Measured CPU rewrites of plain layers, chosen by the `cpu-kernels` converter, never by model code.

Model code builds plain `nn.Linear` / `nn.Embedding` / `nn.GELU` (and `TiedLinear` for a tied output
head). On CPU some of those run faster written differently; the converter
(`torchgraft.tools.cpu_kernels`) swaps in the modules below, which keep the parameters, state-dict
names and results (up to float rounding) and decide here, in one place, where each rewrite pays off
(row count, dtype, device, compile/export state):

- `DecodeLinear` / `DecodeTiedLinear`: the few rows of a decode step. `F.linear(x, W)` computes
  `x @ Wᵀ`; with 1-8 rows MKL runs it as a matrix-vector product that streams the weight at about a
  third of the memory bandwidth on the 2-core machine we measured (5-15 GB/s), while `(W @ xᵀ)ᵀ`
  with at least two columns runs at 20-34 GB/s (`benchmarks/bench_generation.py`). Inside
  `torch.compile` a single row is a multiply-and-sum, which inductor emits as one vectorised,
  multi-threaded reduction streaming the weight about twice as fast again. More rows (training,
  prefill), other dtypes/devices and exported graphs keep `F.linear`.
- `ATenGradEmbedding`: inside `torch.compile` the weight gradient is ATen's kernel instead of
  inductor's atomic scatter-add (1.5-10x slower on CPU: 0.44 vs 0.04 ms for 768 ids into 106 rows).
- `SigmoidGELUTanh`: GELU (tanh) inside `torch.compile` as the identical `x · sigmoid(2u)`;
  inductor's CPU sigmoid is cheaper than its tanh (forward+backward 0.38 vs 0.73 ms, 12 x 64 x 512).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from torchgraft.nn.compiled import in_inductor_graph
from torchgraft.nn.linear import TiedLinear

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


class DecodeLinear(nn.Linear):
    """`nn.Linear` (same parameters and state-dict names) whose forward is `linear` above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class DecodeTiedLinear(TiedLinear):
    """`TiedLinear` (the tied output head) by `linear` above."""

    def forward(self, x: torch.Tensor, embedding: nn.Embedding) -> torch.Tensor:
        return linear(x, embedding.weight)


@torch.library.custom_op("torchgraft::embedding_backward", mutates_args=())
def embedding_backward(grad: torch.Tensor, ids: torch.Tensor, num_weights: int, padding_idx: int) -> torch.Tensor:
    """ATen's dense embedding backward, opaque to the compiler (inductor's own is slower on CPU)."""
    return torch.ops.aten.embedding_dense_backward(grad, ids, num_weights, padding_idx, False)


@embedding_backward.register_fake
def _(grad: torch.Tensor, ids: torch.Tensor, num_weights: int, padding_idx: int) -> torch.Tensor:
    return grad.new_empty(num_weights, grad.shape[-1])


class _Lookup(torch.autograd.Function):
    """`F.embedding` whose weight gradient is `embedding_backward` (the forward stays fusable)."""

    @staticmethod
    def forward(weight: torch.Tensor, ids: torch.Tensor, padding_idx: int) -> torch.Tensor:
        return F.embedding(ids, weight)  # padding_idx (ATen's -1 = none) only affects the gradient

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
        weight, ids, padding_idx = inputs
        ctx.save_for_backward(ids)
        ctx.num_weights, ctx.padding_idx = weight.shape[0], padding_idx

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        (ids,) = ctx.saved_tensors
        return embedding_backward(grad.contiguous(), ids, ctx.num_weights, ctx.padding_idx), None, None


class ATenGradEmbedding(nn.Embedding):
    """`nn.Embedding` (same parameter and state-dict name); inside `torch.compile` its weight gradient
    comes from ATen's kernel instead of inductor's slower scatter-add."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not in_inductor_graph() or self.max_norm is not None or self.scale_grad_by_freq or self.sparse:
            return super().forward(ids)
        return _Lookup.apply(self.weight, ids, -1 if self.padding_idx is None else self.padding_idx)


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


class SigmoidGELUTanh(nn.GELU):
    """`nn.GELU(approximate="tanh")`, `0.5 x (1 + tanh(u))`, u = √(2/π)(x + 0.044715 x³); inside
    `torch.compile` written as the identical `x · sigmoid(2u)` (results agree to float rounding,
    ~5e-7). Eager mode and exported graphs keep `F.gelu(approximate="tanh")`, one fused kernel there."""

    def __init__(self) -> None:
        super().__init__(approximate="tanh")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not in_inductor_graph():
            return F.gelu(x, approximate="tanh")
        return x * torch.sigmoid((2.0 * _SQRT_2_OVER_PI) * (x + 0.044715 * x * x * x))
