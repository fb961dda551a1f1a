"""Rotary position embedding (RoPE), Llama "rotate-half" convention (as Hugging Face LlamaModel).

The head dimension is split into two halves `[x1, x2]`; position `p` rotates pair `(x1[i], x2[i])`
by angle `p * base**(-2i/d)`. Hugging Face Llama checkpoints load without any permutation.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` (B, H, T, D) by `cos`/`sin` (B, T, D) (or broadcastable (T, D))."""
    if cos.dim() == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


def llama3_scale_inv_freq(inv_freq: torch.Tensor, factor: float = 8.0, low_freq_factor: float = 1.0,
                          high_freq_factor: float = 4.0,
                          original_max_position_embeddings: int = 8192) -> torch.Tensor:
    """Llama 3.1 RoPE frequency scaling (as HF's `rope_type="llama3"`): long wavelengths are divided by
    `factor`, short ones kept, the band between interpolated smoothly."""
    old = original_max_position_embeddings
    low_wavelen, high_wavelen = old / low_freq_factor, old / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Computes RoPE `cos`/`sin` for given positions.

    Holds only `inv_freq` (head_dim/2 floats) as a non-persistent float32 buffer, recomputed by
    `reset_parameters()`, so it is absent from state dicts and free on the meta device. `cos`/`sin`
    are computed in float32 from integer positions on each call (any length, no table limit).
    """

    def __init__(self, head_dim: int, base: float = 10000.0, device=None, scaling: dict | None = None):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        if scaling is not None and scaling.get("type") != "llama3":
            raise ValueError(f"unknown RoPE scaling {scaling.get('type')!r}; supported: 'llama3'")
        self.head_dim = head_dim
        self.base = float(base)
        self.scaling = dict(scaling) if scaling else None
        self.register_buffer("inv_freq", torch.empty(head_dim // 2, dtype=torch.float32, device=device),
                             persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.inv_freq.is_meta:
            return
        idx = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=self.inv_freq.device).float()
        inv_freq = 1.0 / (self.base ** (idx / self.head_dim))
        if self.scaling is not None:
            inv_freq = llama3_scale_inv_freq(inv_freq, **{k: v for k, v in self.scaling.items() if k != "type"})
        self.inv_freq.copy_(inv_freq)

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
        device_type = "cpu" if position_ids.device.type == "meta" else position_ids.device.type
        with torch.autocast(device_type=device_type, enabled=False):
            freqs = position_ids.float().unsqueeze(-1) * inv  # (B, T, D/2)
            emb = torch.cat((freqs, freqs), dim=-1)
            return emb.cos(), emb.sin()

    def extra_repr(self) -> str:
        extra = f", scaling={self.scaling}" if self.scaling else ""
        return f"head_dim={self.head_dim}, base={self.base:g}{extra}"
