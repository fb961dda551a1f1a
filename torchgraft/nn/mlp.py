"""Feed-forward blocks: GELU MLP (`fc_in`, `fc_out`) and gated MLP / SwiGLU (`gate_proj`, `up_proj`, `down_proj`)."""
from __future__ import annotations

import torch
from torch import nn


ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu", "quick_gelu")
_ALIASES = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "swish": "silu"}


class QuickGELU(nn.Module):
    """`x * sigmoid(1.702 x)` (CLIP)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def activation_fn(name: str) -> nn.Module:
    """The activation module: 'gelu' (exact erf, BERT/ViT), 'gelu_tanh' (GPT-2 'gelu_new'), 'relu',
    'silu', 'quick_gelu'. A module (not a function) so that converters can swap it."""
    name = _ALIASES.get(name, name)
    if name == "gelu":
        return nn.GELU()
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    if name == "relu":
        return nn.ReLU()
    if name == "silu":
        return nn.SiLU()
    if name == "quick_gelu":
        return QuickGELU()
    raise ValueError(f"unknown activation {name!r}; choose from {', '.join(ACTIVATIONS)}")


class MLP(nn.Module):
    """`fc_out(dropout?(act(fc_in(x))))`: dim -> hidden -> dim."""

    output_projection = "fc_out"  # the layer writing into the residual stream

    def __init__(self, dim: int, hidden: int, bias: bool = True, activation: str = "gelu",
                 dropout: float = 0.0):
        super().__init__()
        self.activation = activation
        self.act = activation_fn(activation)
        self.fc_in = nn.Linear(dim, hidden, bias=bias)
        self.fc_out = nn.Linear(hidden, dim, bias=bias)
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
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

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
        self.gate_up_proj = nn.Linear(dim, 2 * hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # (B, T, hidden) each
        return self.down_proj(self.act(gate) * up)

    def extra_repr(self) -> str:
        return f"activation={self.activation}"
