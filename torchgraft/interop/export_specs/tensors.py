"""`tensors`: any module's positional tensor inputs (`input_0`, `input_1`, ...), dynamic batch.

The fallback kind: it accepts every tuple of tensors, so a user's own module exports without a spec
of its own. The first output is `logits`, further ones `output_1`, ...
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from torchgraft.interop.export_spec import ExportSpec, register_export_spec


@register_export_spec
class TensorsSpec(ExportSpec):
    name = "tensors"
    priority = -100  # the fallback: tried last
    first_name = "input_0"  # the name of the first input (subclasses: "images", ...)

    def __init__(self, model: nn.Module, example: tuple[torch.Tensor, ...], axes: set[str]):
        super().__init__(model, example, axes)
        self.inputs = tuple(example)
        self.input_names = [self.first_name] + [f"input_{i}" for i in range(1, len(example))]
        self.dynamic_axes = {n: ({0: "batch"} if "batch" in axes and x.dim() > 0 else {})
                             for n, x in zip(self.input_names, self.inputs)}

    @classmethod
    def accepts(cls, model: nn.Module, example: tuple[Any, ...]) -> bool:
        return True

    def more_examples(self) -> list[tuple[torch.Tensor, ...]]:
        """One float input: the same at batch + 1 (when the batch is dynamic)."""
        x = self.inputs[0]
        axes = self.dynamic_axes.get(self.input_names[0])
        if not axes or len(self.inputs) != 1 or not x.dtype.is_floating_point:
            return []
        b = x.shape[0] + 1 if 0 in axes else x.shape[0]
        gen = torch.Generator().manual_seed(1)
        return [(torch.randn((b, *x.shape[1:]), generator=gen).to(x),)]
