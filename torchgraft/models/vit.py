"""Vision Transformer family (timm-style ViT with separate q/k/v projections).

State-dict names: `patch_embed.proj`, `cls_token` (1, 1, C), `pos_embed` (1, N + 1, C),
`blocks.{i}.{attn_norm,attn.{q,k,v,o}_proj,mlp_norm,mlp.{fc_in,fc_out}}`, `norm`, `head`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from torchgraft.errors import ConfigError
from torchgraft.models.parts import ModelParts, image_inputs
from torchgraft.models.registry import register_family, register_preset
from torchgraft.nn.attention import Attention
from torchgraft.nn.embedding import PatchEmbed
from torchgraft.nn.mlp import MLP
from torchgraft.nn.norm import LayerNorm
from torchgraft.nn.transformer import PreNormBlock


@dataclass
class ViTConfig:
    image_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000  # 0 = no head (forward returns pooled features)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    intermediate_size: int | None = None  # None = 4 * n_embd
    norm_eps: float = 1e-6
    bias: bool = True
    dropout: float = 0.0
    activation: str = "gelu"
    pool: Literal["cls", "mean"] = "cls"
    init_std: float = 0.02

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ConfigError(f"model.image_size ({self.image_size}) must be a multiple of "
                              f"model.patch_size ({self.patch_size})")
        if self.n_embd % self.n_head:
            raise ConfigError(f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})")


class ViT(nn.Module):
    """`forward(x (B, C, H, W)) -> logits (B, num_classes)`."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = c = config
        C = c.n_embd
        self.patch_embed = PatchEmbed(c.image_size, c.patch_size, c.in_chans, C)
        n = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.empty(1, 1, C))
        self.pos_embed = nn.Parameter(torch.empty(1, n + 1, C))
        self.drop = nn.Dropout(c.dropout) if c.dropout else nn.Identity()
        hidden = c.intermediate_size or 4 * C
        self.blocks = nn.ModuleList(
            PreNormBlock(Attention(C, c.n_head, causal=False, bias=c.bias, dropout=c.dropout),
                         MLP(C, hidden, bias=c.bias, activation=c.activation, dropout=c.dropout),
                         LayerNorm(C, c.norm_eps), LayerNorm(C, c.norm_eps), dropout=c.dropout)
            for _ in range(c.n_layer))
        self.norm = LayerNorm(C, c.norm_eps)
        self.head = nn.Linear(C, c.num_classes) if c.num_classes > 0 else nn.Identity()
        if not self.pos_embed.is_meta:
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """timm: trunc_normal(0.02) for pos_embed and Linear weights, zero biases, cls_token ~ N(0, 1e-6)."""
        std = self.config.init_std
        nn.init.trunc_normal_(self.pos_embed, std=std, a=-2 * std, b=2 * std)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                m.reset_parameters()

    def parts(self) -> ModelParts:
        n = len(self.blocks)
        return ModelParts(
            blocks=tuple(f"blocks.{i}" for i in range(n)), input_layer="patch_embed.proj",
            classifier="head" if self.config.num_classes > 0 else None, position_embedding="pos_embed",
            residual_projections=tuple(f"blocks.{i}.{r}" for i, b in enumerate(self.blocks)
                                       for r in b.residual_projections()),
            example_inputs=self.example_inputs)

    def example_inputs(self, batch_size: int = 1, seq_len: int | None = None) -> tuple[torch.Tensor]:
        """`(images,)` (batch_size, in_chans, image_size, image_size); `seq_len` is ignored."""
        return image_inputs(self, self.config.in_chans, self.config.image_size, batch_size)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised tokens (B, N + 1, C), [CLS] first."""
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, 0] if self.config.pool == "cls" else tokens[:, 1:].mean(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.forward_features(x)))


register_family("vit", ViTConfig, ViT)
register_preset("vit-tiny", "vit", description="ViT-Ti/16, 224px",
                n_layer=12, n_head=3, n_embd=192)
register_preset("vit-small", "vit", description="ViT-S/16, 224px",
                n_layer=12, n_head=6, n_embd=384)
register_preset("vit-base", "vit", description="ViT-B/16, 224px, 86.6M with a 1000-class head",
                n_layer=12, n_head=12, n_embd=768)
register_preset("vit-digits", "vit", description="small ViT for 1x32x32 digits (patch 8, 10 classes)",
                image_size=32, patch_size=8, in_chans=1, num_classes=10, n_layer=4, n_head=4, n_embd=64)
