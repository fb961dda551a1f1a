"""`image`: an image batch `images` (B, C, H, W) (LeNet, ResNet, ViT), dynamic batch."""
from __future__ import annotations

from typing import Any

from torch import nn

from torchgraft.interop.export_spec import register_export_spec
from torchgraft.interop.export_specs.tensors import TensorsSpec


@register_export_spec
class ImageSpec(TensorsSpec):
    name = "image"
    priority = -30
    first_name = "images"

    @classmethod
    def accepts(cls, model: nn.Module, example: tuple[Any, ...]) -> bool:
        return example[0].dim() == 4 and example[0].dtype.is_floating_point
