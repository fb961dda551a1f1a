"""Rotary position embedding (RoPE), Llama "rotate-half" convention (as Hugging Face LlamaModel).

The head dimension is split into two halves `[x1, x2]`; position `p` rotates pair `(x1[i], x2[i])`
by angle `p * base**(-2i/d)`. Hugging Face Llama checkpoints load without any permutation.
"""
from __future__ import annotations

import torch
from torch import nn

from torchgraft.nn.rope_scaling import RopeScaling, scaling_from_dict


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` (B, H, T, D) by `cos`/`sin` (B, T, R) (or broadcastable (T, R)). With R < D
    (partial rotary, Phi-3 / Phi-4) only the first R channels rotate, the rest pass through."""
    if cos.dim() == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    r = cos.shape[-1]
    if r < x.shape[-1]:
        x_rot, x_pass = x[..., :r], x[..., r:]
        return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)
    return x * cos + rotate_half(x) * sin


class RotaryEmbedding(nn.Module):
    """Computes RoPE `cos`/`sin` for given positions.

    Holds only `inv_freq` (head_dim/2 floats) as a non-persistent float32 buffer, recomputed by
    `reset_parameters()`, so it is absent from state dicts and free on the meta device. `cos`/`sin`
    are computed in float32 from integer positions on each call (any length, no table limit).
    """

    def __init__(self, head_dim: int, base: float = 10000.0, device=None,
                 scaling: RopeScaling | dict | None = None):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        self.head_dim = head_dim  # the rotated width (< the attention head_dim for partial rotary)
        self.base = float(base)
        self.scaling = scaling if isinstance(scaling, RopeScaling) else scaling_from_dict(scaling)
        self.register_buffer("inv_freq", torch.empty(head_dim // 2, dtype=torch.float32, device=device),
                             persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.inv_freq.is_meta:
            return
        self.inv_freq.copy_(self.scaling.inv_freq(self.base, self.head_dim, self.inv_freq.device))

    def _apply(self, fn, recurse=True):
        # keep inv_freq float32 under model.to(bfloat16) / .half(): recompute it instead of rounding
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:
            self.inv_freq = self.inv_freq.float()
            self.reset_parameters()
        return self

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`position_ids` (B, T) or (T,) -> `(cos, sin)` each (B, T, head_dim) float32."""
        if position_ids.dim() == 1:
            position_ids = position_ids.unsqueeze(0)
        inv = self.inv_freq.float()
        if self.scaling.length_dependent:  # dynamic NTK, LongRoPE
            inv = self.scaling.at_length(inv, self.base, self.head_dim, position_ids.max() + 1)
        device_type = "cpu" if position_ids.device.type == "meta" else position_ids.device.type
        with torch.autocast(device_type=device_type, enabled=False):
            freqs = position_ids.float().unsqueeze(-1) * inv  # (B, T, D/2)
            emb = torch.cat((freqs, freqs), dim=-1)
            factor = self.scaling.attention_factor
            if factor != 1.0:
                return emb.cos() * factor, emb.sin() * factor
            return emb.cos(), emb.sin()

    def extra_repr(self) -> str:
        extra = f", scaling={self.scaling}" if self.scaling.rope_type != "default" else ""
        return f"head_dim={self.head_dim}, base={self.base:g}{extra}"
