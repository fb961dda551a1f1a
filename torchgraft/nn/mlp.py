"""Feed-forward blocks: GELU MLP (`fc_in`, `fc_out`) and gated MLP / SwiGLU (`gate_proj`, `up_proj`, `down_proj`)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from torchgraft.nn.compiled import in_inductor_graph
from torchgraft.nn.linear import Linear

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu", "quick_gelu")


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation (GPT-2's "gelu_new"): `0.5 x (1 + tanh(u))`, u = √(2/π)(x + 0.044715 x³).

    Inside `torch.compile` it is written as the identical `x · sigmoid(2u)`: inductor's CPU
    sigmoid is cheaper than its tanh, and forward+backward take about half the time (0.38 vs
    0.73 ms for 12 x 64 x 512); results agree to float rounding (~5e-7). Eager mode and exported
    graphs keep `F.gelu(approximate="tanh")`, one fused kernel there."""
    if not in_inductor_graph():
        return F.gelu(x, approximate="tanh")
    return x * torch.sigmoid((2.0 * _SQRT_2_OVER_PI) * (x + 0.044715 * x * x * x))


def activation_fn(name: str):
    """'gelu' (exact erf, BERT/ViT), 'gelu_tanh' (GPT-2 'gelu_new'), 'relu', 'silu', 'quick_gelu'."""
    if name == "gelu":
        return F.gelu
    if name in ("gelu_tanh", "gelu_new", "gelu_pytorch_tanh"):
        return gelu_tanh
    if name == "relu":
        return F.relu
    if name in ("silu", "swish"):
        return F.silu
    if name == "quick_gelu":
        return quick_gelu
    raise ValueError(f"unknown activation {name!r}; choose from {', '.join(ACTIVATIONS)}")


class MLP(nn.Module):
    """`fc_out(dropout?(act(fc_in(x))))`: dim -> hidden -> dim."""

    output_projection = "fc_out"  # the layer writing into the residual stream

    def __init__(self, dim: int, hidden: int, bias: bool = True, activation: str = "gelu",
                 dropout: float = 0.0):
        super().__init__()
        self.activation = activation
        self.act = activation_fn(activation)
        self.fc_in = Linear(dim, hidden, bias=bias)
        self.fc_out = Linear(hidden, dim, bias=bias)
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.drop(self.act(self.fc_in(x))))

    def extra_repr(self) -> str:
        return f"activation={self.activation}"


class GatedMLP(nn.Module):
    """`down_proj(act(gate_proj(x)) * up_proj(x))`; with activation 'silu' this is SwiGLU (Llama)."""

    output_projection = "down_proj"  # the layer writing into the residual stream

    def __init__(self, dim: int, hidden: int, bias: bool = False, activation: str = "silu"):
        super().__init__()
        self.activation = activation
        self.act = activation_fn(activation)
        self.gate_proj = Linear(dim, hidden, bias=bias)
        self.up_proj = Linear(dim, hidden, bias=bias)
        self.down_proj = Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))

    def extra_repr(self) -> str:
        return f"activation={self.activation}"


class FusedGatedMLP(nn.Module):
    """`GatedMLP` with gate and up in one `gate_up_proj` (Phi-3 / Phi-4 checkpoints and PEFT targets):
    `down_proj(act(gate) * up)`, `[gate, up] = gate_up_proj(x).chunk(2)`."""

    output_projection = "down_proj"

    def __init__(self, dim: int, hidden: int, bias: bool = False, activation: str = "silu"):
        super().__init__()
        self.activation = activation
        self.act = activation_fn(activation)
        self.gate_up_proj = Linear(dim, 2 * hidden, bias=bias)
        self.down_proj = Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # (B, T, hidden) each
        return self.down_proj(self.act(gate) * up)

    def extra_repr(self) -> str:
        return f"activation={self.activation}"
