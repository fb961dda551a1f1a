"""Embeddings: token + learned positions (+ token types), image patch embedding."""
from __future__ import annotations

import torch
from torch import nn


class TokenPositionEmbedding(nn.Module):
    """`tok_emb(ids) + pos_emb(positions) [+ type_emb(types)]`, then optional `norm` and dropout.

    State-dict names: `tok_emb.weight`, `pos_emb.weight`, `type_emb.weight`, `norm.*`
    (`max_positions=0` / `type_vocab_size=0` / `norm=None` leave that part out).
    """

    def __init__(self, vocab_size: int, dim: int, max_positions: int = 0, type_vocab_size: int = 0,
                 norm: nn.Module | None = None, dropout: float = 0.0, padding_idx: int | None = None):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab_size, dim, padding_idx=padding_idx)
        self.pos_emb = nn.Embedding(max_positions, dim) if max_positions else None
        self.type_emb = nn.Embedding(type_vocab_size, dim) if type_vocab_size else None
        self.norm = norm
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        x = self.tok_emb(input_ids)
        if self.pos_emb is not None:
            if position_ids is None:
                position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
            x = x + self.pos_emb(position_ids)
        if self.type_emb is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            x = x + self.type_emb(token_type_ids)
        if self.norm is not None:
            x = self.norm(x)
        return self.drop(x)


class PatchEmbed(nn.Module):
    """Image (B, C, H, W) -> patch tokens (B, N, dim) with a strided conv `proj` (ViT)."""

    def __init__(self, image_size: int = 224, patch_size: int = 16, in_chans: int = 3, dim: int = 768,
                 bias: bool = True):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} must be a multiple of patch_size {patch_size}")
        self.image_size, self.patch_size = image_size, patch_size
        self.grid = image_size // patch_size
        self.num_patches = self.grid * self.grid
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)
