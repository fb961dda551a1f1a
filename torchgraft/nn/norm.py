"""Normalisation layers: LayerNorm (optional bias) and RMSNorm (computed in float32, like HF Llama)."""
from __future__ import annotations

import torch
from torch import nn


class LayerNorm(nn.LayerNorm):
    """`nn.LayerNorm` over the last dim with an optional bias (state-dict names `weight`, `bias`)."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True, device=None, dtype=None):
        super().__init__(dim, eps=eps, elementwise_affine=True, bias=bias, device=device, dtype=dtype)


class RMSNorm(nn.Module):
    """Root-mean-square norm: `weight * x / sqrt(mean(x^2) + eps)`.

    The statistic is computed in float32 and the result cast back to the input dtype before the
    weight multiply, exactly as Hugging Face's `LlamaRMSNorm`.
    """

    def __init__(self, dim: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


class OffsetRMSNorm(RMSNorm):
    """Gemma's RMSNorm: `x / rms(x) * (1 + weight)`, all in float32, cast back at the end; the weight
    is stored as the offset from 1 (checkpoints hold it that way), so it starts at zero."""

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).to(x.dtype)


class HeadNorm(nn.Module):
    """Apply `norm` (over head_dim) to each head of a (..., heads * head_dim) projection (Qwen3, Gemma 3 q/k norm)."""

    def __init__(self, norm: nn.Module, head_dim: int):
        super().__init__()
        self.norm = norm
        self.head_dim = head_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.unflatten(-1, (-1, self.head_dim))).flatten(-2)  # (..., H, D) -> (..., H * D)


def make_norm(kind: str, dim: int, eps: float, bias: bool = True) -> nn.Module:
    """`kind` is "layer" or "rms"."""
    if kind == "layer":
        return LayerNorm(dim, eps=eps, bias=bias)
    if kind == "rms":
        return RMSNorm(dim, eps=eps)
    raise ValueError(f"unknown norm kind {kind!r}; use 'layer' or 'rms'")
