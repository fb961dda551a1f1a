"""Transformer blocks composed from submodules: `attn`, `mlp`, `attn_norm`, `mlp_norm`.

- `PreNormBlock` (GPT-2, Llama, ViT): `x += attn(attn_norm(x)); x += mlp(mlp_norm(x))`.
- `PostNormBlock` (BERT): `x = attn_norm(x + attn(x)); x = mlp_norm(x + mlp(x))`.
- `SandwichBlock` (Gemma 2/3, OLMo-2): `x += attn_post_norm(attn(attn_norm(x)));
  x += mlp_post_norm(mlp(mlp_norm(x)))`; OLMo-2 passes `nn.Identity()` as the two input norms.
"""
from __future__ import annotations

import torch
from torch import nn


class _Block(nn.Module):
    """Declarations shared by both block kinds (read by `ModelParts` builders and `grow`)."""

    zero_residual_is_identity = True  # zeroing residual_projections() makes the block the identity

    def residual_projections(self) -> list[str]:
        """Names (relative to the block) of the layers writing into the residual stream."""
        branches = (("attn", self.attn), ("mlp", self.mlp))
        return [f"{name}.{m.output_projection}" for name, m in branches if hasattr(m, "output_projection")]


class PreNormBlock(_Block):
    def __init__(self, attn: nn.Module, mlp: nn.Module, attn_norm: nn.Module, mlp_norm: nn.Module,
                 dropout: float = 0.0):
        super().__init__()
        self.attn_norm = attn_norm
        self.attn = attn
        self.mlp_norm = mlp_norm
        self.mlp = mlp
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, kv_cache=None, rope=None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), attention_mask=attention_mask,
                                    position_ids=position_ids, kv_cache=kv_cache, rope=rope))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class PostNormBlock(_Block):
    zero_residual_is_identity = False  # norm(x + 0) != x

    def __init__(self, attn: nn.Module, mlp: nn.Module, attn_norm: nn.Module, mlp_norm: nn.Module,
                 dropout: float = 0.0):
        super().__init__()
        self.attn = attn
        self.attn_norm = attn_norm
        self.mlp = mlp
        self.mlp_norm = mlp_norm
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, kv_cache=None, rope=None) -> torch.Tensor:
        x = self.attn_norm(x + self.drop(self.attn(x, attention_mask=attention_mask,
                                                   position_ids=position_ids, kv_cache=kv_cache, rope=rope)))
        return self.mlp_norm(x + self.drop(self.mlp(x)))


class SandwichBlock(_Block):
    """A residual block with a norm on each side of each sublayer (the inner ones may be Identity).
    Zeroing the residual projections still gives the identity: the post norms map 0 to 0."""

    def __init__(self, attn: nn.Module, mlp: nn.Module, attn_norm: nn.Module, mlp_norm: nn.Module,
                 attn_post_norm: nn.Module, mlp_post_norm: nn.Module, dropout: float = 0.0):
        super().__init__()
        self.attn_norm = attn_norm
        self.attn = attn
        self.attn_post_norm = attn_post_norm
        self.mlp_norm = mlp_norm
        self.mlp = mlp
        self.mlp_post_norm = mlp_post_norm
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, kv_cache=None, rope=None) -> torch.Tensor:
        h = self.attn(self.attn_norm(x), attention_mask=attention_mask, position_ids=position_ids,
                      kv_cache=kv_cache, rope=rope)  # (B, T, C)
        x = x + self.drop(self.attn_post_norm(h))
        return x + self.drop(self.mlp_post_norm(self.mlp(self.mlp_norm(x))))
