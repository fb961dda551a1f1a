"""Task heads usable on any backbone, and `TaskModel` to put one on a backbone.

Every head takes the backbone's features plus an optional `attention_mask`:
- `SequenceClassificationHead(dim, num_labels, pooling="cls"|"mean"|"last"|"max", dense=False)`:
  (B, T, C) or (B, C) -> (B, num_labels). `dense=True` adds a tanh dense layer first (BERT pooler).
  Pooling respects `attention_mask` ("last" finds the last real token under left or right padding).
- `TokenClassificationHead(dim, num_labels)`: (B, T, C) -> (B, T, num_labels).
- `ImageClassificationHead(dim, num_classes, pooling="avg"|"cls"|"mean")`: (B, C, H, W) feature maps
  (global average pool), (B, N, C) tokens (cls / mean) or (B, C) vectors -> (B, num_classes).
- `LMHead(dim, vocab_size)`: (B, T, C) -> (B, T, vocab_size).

`TaskModel(backbone, head)` calls `backbone.forward_features(...)` (every zoo model has it: decoder LMs
and BERT return hidden states (B, T, C), ViT normalised tokens, ResNet pooled features) or, without
it, `backbone(...)`, then the head. State-dict names: `backbone.*`, `head.*`.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import nn

from torchgraft.models.parts import ModelParts, parts_of


def pool_tokens(hidden: torch.Tensor, pooling: str, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T, C) -> (B, C) by "cls" (first token), "mean"/"max" (over real tokens) or "last" (last real token)."""
    if hidden.dim() == 2:
        return hidden
    if pooling == "cls":
        return hidden[:, 0]
    mask = None if attention_mask is None else attention_mask.to(torch.bool)
    if pooling == "mean":
        if mask is None:
            return hidden.mean(1)
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1)
    if pooling == "max":
        if mask is None:
            return hidden.amax(1)
        return hidden.masked_fill(~mask.unsqueeze(-1), torch.finfo(hidden.dtype).min).amax(1)
    if pooling == "last":
        if mask is None:
            return hidden[:, -1]
        t = mask.shape[1]
        idx = t - 1 - mask.flip(1).to(torch.int64).argmax(1)  # last True in each row
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
    raise ValueError(f"unknown pooling {pooling!r}; use cls, mean, max or last")


class SequenceClassificationHead(nn.Module):
    def __init__(self, dim: int, num_labels: int, pooling: Literal["cls", "mean", "max", "last"] = "cls",
                 dropout: float = 0.0, dense: bool = False):
        super().__init__()
        self.pooling = pooling
        self.dense = nn.Linear(dim, dim) if dense else None
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()
        self.classifier = nn.Linear(dim, num_labels)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = pool_tokens(hidden, self.pooling, attention_mask)
        if self.dense is not None:
            x = torch.tanh(self.dense(x))
        return self.classifier(self.drop(x))


class TokenClassificationHead(nn.Module):
    def __init__(self, dim: int, num_labels: int, dropout: float = 0.0):
        super().__init__()
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()
        self.classifier = nn.Linear(dim, num_labels)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.classifier(self.drop(hidden))


class ImageClassificationHead(nn.Module):
    def __init__(self, dim: int, num_classes: int, pooling: Literal["avg", "cls", "mean"] = "avg",
                 dropout: float = 0.0, norm: bool = False):
        super().__init__()
        self.pooling = pooling
        self.norm = nn.LayerNorm(dim) if norm else None
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, features: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if features.dim() == 4:  # (B, C, H, W)
            x = features.mean(dim=(2, 3))
        elif features.dim() == 3:  # (B, N, C)
            x = pool_tokens(features, "cls" if self.pooling == "cls" else "mean")
        else:
            x = features
        if self.norm is not None:
            x = self.norm(x)
        return self.fc(self.drop(x))


class LMHead(nn.Module):
    def __init__(self, dim: int, vocab_size: int, bias: bool = False):
        super().__init__()
        self.proj = nn.Linear(dim, vocab_size, bias=bias)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.proj(hidden)


def feature_dim(backbone: nn.Module) -> int:
    """Width of `backbone.forward_features` output for zoo models (n_embd or ResNet's num_features)."""
    if hasattr(backbone, "num_features"):
        return int(backbone.num_features)
    cfg = getattr(backbone, "config", None)
    if cfg is not None and hasattr(cfg, "n_embd"):
        return int(cfg.n_embd)
    raise ValueError(f"cannot infer the feature width of {type(backbone).__name__}; pass it explicitly")


class TaskModel(nn.Module):
    """`head(backbone.forward_features(*args, **kwargs), attention_mask=...)`."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def parts(self) -> ModelParts | None:
        """The backbone's declaration under `backbone.`, with `head` as the classifier (None when
        the backbone declares nothing)."""
        inner = parts_of(self.backbone)
        if inner is None:
            return None
        inner = inner.prefixed("backbone")
        lm_heads = {inner.classifier} if inner.classifier in inner.vocab else set()
        return dataclasses.replace(inner, classifier="head", vocab=tuple(v for v in inner.vocab if v not in lm_heads))

    def forward(self, *args, **kwargs) -> torch.Tensor:
        features = getattr(self.backbone, "forward_features", self.backbone)(*args, **kwargs)
        if isinstance(features, (tuple, list)):
            features = features[0]
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1 and torch.is_tensor(args[1]) and args[1].dim() == 2:
            mask = args[1]
        return self.head(features, attention_mask=mask)
