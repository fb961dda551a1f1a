"""`text-pair`: a BERT-style encoder over sentence pairs: `input_ids`, `attention_mask` and
`token_type_ids` (0 for the first text, 1 for the second), each (B, T), dynamic batch and sequence.

Chosen automatically when the example is three token tensors of one shape and forward takes
`token_type_ids`; `spec="text-pair"` (`--spec text-pair`) on an `(input_ids,)` example adds an
all-ones mask and types that split each row in half, so the type embedding is in the graph.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from torchgraft.errors import ConfigError
from torchgraft.interop.export_spec import (ExportSpec, config_of, is_token_input, register_export_spec,
                                            takes)
from torchgraft.interop.export_specs.tokens import longer_ids, token_axes

NAMES = ["input_ids", "attention_mask", "token_type_ids"]


def pair_types(ids: torch.Tensor) -> torch.Tensor:
    """Token types of a pair laid out as first half / second half of each row: (B, T) in {0, 1}."""
    t = ids.shape[1]
    return (torch.arange(t, device=ids.device) >= t // 2).long().expand_as(ids).contiguous()


@register_export_spec
class TextPairSpec(ExportSpec):
    name = "text-pair"
    priority = -10

    def __init__(self, model: nn.Module, example: tuple[torch.Tensor, ...], axes: set[str]):
        super().__init__(model, example, axes)
        if not takes(model, "token_type_ids"):
            raise ConfigError(f"{type(model).__name__}.forward takes no token_type_ids; the text-pair spec is "
                              "for BERT-style encoders (use the tokens spec)")
        if not 1 <= len(example) <= 3 or not all(is_token_input(x) for x in example):
            raise ConfigError("the text-pair spec takes (input_ids[, attention_mask[, token_type_ids]]) token "
                              "tensors of shape (batch, seq)")
        ids = example[0]
        mask = example[1] if len(example) > 1 else torch.ones_like(ids)
        types = example[2] if len(example) > 2 else pair_types(ids)
        self.inputs, self.input_names = (ids, mask, types), list(NAMES)
        self.dynamic_axes = {n: token_axes(axes) for n in NAMES}
        self.max_seq = getattr(config_of(model), "block_size", None)

    @classmethod
    def accepts(cls, model: nn.Module, example: tuple[Any, ...]) -> bool:
        return (len(example) == 3 and all(is_token_input(x) and x.shape == example[0].shape for x in example)
                and takes(model, "token_type_ids"))

    def more_examples(self) -> list[tuple[torch.Tensor, ...]]:
        """One row and three tokens longer, all-ones mask, the types split in half."""
        if not self.dynamic_axes["input_ids"]:
            return []
        ids = longer_ids(self.model, self.inputs[0], self.dynamic_axes["input_ids"], self.max_seq)
        return [(ids, torch.ones_like(ids), pair_types(ids))]
