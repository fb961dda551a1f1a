"""What a model declares about itself, so tools adapt exactly those parts instead of guessing.

Like timm's pretrained configs (`first_conv`, `classifier`), every zoo model implements
`parts() -> ModelParts`. Module names are qualified names as in `model.named_modules()`.
Tools (transfer policies, grow, parallelize, summary, layer-wise decay, export) call `parts_of(model)`
and fall back to name heuristics only when it returns None (a user's own module).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class ModelParts:
    blocks: tuple[str, ...] = ()                 # the repeated blocks, in order ("blocks.0", ...)
    input_layer: str | None = None               # first layer that sees the input (conv / embedding)
    classifier: str | None = None                # the output head ("fc", "head", "lm_head", ...)
    position_embedding: str | None = None        # learned position table/parameter, if any
    residual_projections: tuple[str, ...] = ()   # layers writing into the residual stream
    # example positional inputs of `forward` for a batch: (batch_size, seq_len or None) -> tuple
    example_inputs: Callable[[int, int | None], tuple[torch.Tensor, ...]] | None = field(
        default=None, compare=False)


def parts_of(model: nn.Module) -> ModelParts | None:
    """The model's declaration, or None for a module that declares nothing."""
    declare = getattr(model, "parts", None)
    return declare() if callable(declare) else None
