"""What a model declares about itself, so tools adapt exactly those parts instead of guessing.

Like timm's pretrained configs (`first_conv`, `classifier`), every zoo model implements
`parts() -> ModelParts`. Names are qualified names as in `model.named_modules()` (or, for a bare
`nn.Parameter` such as ViT's `pos_embed`, `model.named_parameters()`). A tensor belongs to a part
when its state-dict name is the part's name or starts with it plus ".".
Tools (transfer policies, grow, parallelize, summary, layer-wise decay, export) call `parts_of(model)`
and fall back to name heuristics only when it returns None (a user's own module).
"""
from __future__ import annotations

import dataclasses
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
    vocab: tuple[str, ...] = ()                  # tables with one row per token (tok_emb, lm_head)
    # zeroing a block's residual projections turns it into the identity (False for post-norm
    # blocks, where norm(x + 0) != x); `grow` deepens only when this holds
    zero_residual_is_identity: bool = True

    def prefixed(self, prefix: str) -> ModelParts:
        """The same declaration for this model mounted as submodule `prefix` (e.g. "backbone")."""
        def p(name: str | None) -> str | None:
            return None if name is None else f"{prefix}.{name}"
        return dataclasses.replace(
            self, blocks=tuple(p(b) for b in self.blocks), input_layer=p(self.input_layer),
            classifier=p(self.classifier), position_embedding=p(self.position_embedding),
            residual_projections=tuple(p(r) for r in self.residual_projections),
            vocab=tuple(p(v) for v in self.vocab))

    def role_of(self, tensor_name: str) -> str | None:
        """Which declared part a state-dict tensor belongs to: "vocab", "position_embedding",
        "input_layer", "classifier", or None (checked in that order)."""
        if any(owns(v, tensor_name) for v in self.vocab):
            return "vocab"
        for role in ("position_embedding", "input_layer", "classifier"):
            part = getattr(self, role)
            if part is not None and owns(part, tensor_name):
                return role
        return None

    def block_of(self, tensor_name: str) -> int | None:
        """Index of the declared block holding `tensor_name`, or None."""
        for i, b in enumerate(self.blocks):
            if owns(b, tensor_name):
                return i
        return None

    def residual_projections_in(self, block: str) -> list[str]:
        """The residual projections inside `block`, relative to it ("attn.o_proj", ...)."""
        return [r[len(block) + 1:] for r in self.residual_projections if r.startswith(block + ".")]


def owns(part: str, name: str) -> bool:
    """True when `name` is `part` or lies inside it."""
    return name == part or name.startswith(part + ".")


def parts_of(model: nn.Module) -> ModelParts | None:
    """The model's declaration, or None for a module that declares nothing."""
    declare = getattr(model, "parts", None)
    return declare() if callable(declare) else None


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a parameter-free module)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def token_inputs(model: nn.Module, vocab_size: int, max_len: int, batch_size: int,
                 seq_len: int | None) -> tuple[torch.Tensor]:
    """`(input_ids,)` (batch_size, seq_len or max_len) of valid token ids on the model's device."""
    t = seq_len or max_len
    ids = torch.arange(batch_size * t).remainder(vocab_size)  # on CPU: on meta this op imports torch._dynamo
    return (ids.reshape(batch_size, t).to(model_device(model)),)


def image_inputs(model: nn.Module, in_chans: int, size: int, batch_size: int) -> tuple[torch.Tensor]:
    """`(images,)` (batch_size, in_chans, size, size) zeros on the model's device."""
    return (torch.zeros(batch_size, in_chans, size, size, device=model_device(model)),)
