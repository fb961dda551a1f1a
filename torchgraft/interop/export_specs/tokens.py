"""`tokens`: token ids `input_ids` (B, T), plus `attention_mask` (B, T) when forward takes one
(GPT, Llama, BERT, ...), dynamic batch and sequence (bounded by the model's `block_size`)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from torchgraft.interop.export_spec import (ExportSpec, config_of, is_token_input, register_export_spec,
                                            takes)


def token_axes(axes: set[str]) -> dict[int, str]:
    """The named dims of a (B, T) input for the axes asked for."""
    return {**({0: "batch"} if "batch" in axes else {}), **({1: "seq"} if "seq" in axes else {})}


def longer_ids(model: nn.Module, ids: torch.Tensor, axes: dict[int, str], max_seq: int | None) -> torch.Tensor:
    """Token ids like `ids`, one row and three tokens longer along the dynamic `axes` (`seq` capped at
    `max_seq`), drawn below the model's vocabulary: the check's second example."""
    b = ids.shape[0] + 1 if 0 in axes else ids.shape[0]
    t = ids.shape[1] + 3 if 1 in axes else ids.shape[1]
    if max_seq:
        t = min(t, max_seq)
    gen = torch.Generator().manual_seed(1)
    vocab = getattr(config_of(model), "vocab_size", int(ids.max()) + 1)
    return torch.randint(0, vocab, (b, t), generator=gen).to(ids.device)


@register_export_spec
class TokenSpec(ExportSpec):
    name = "tokens"
    priority = -20

    def __init__(self, model: nn.Module, example: tuple[torch.Tensor, ...], axes: set[str]):
        super().__init__(model, example, axes)
        inputs = list(example)
        names = ["input_ids"] + [f"input_{i}" for i in range(1, len(example))]
        if len(example) == 1 and takes(model, "attention_mask"):
            inputs.append(torch.ones_like(example[0]))
            names.append("attention_mask")
        self.inputs, self.input_names = tuple(inputs), names
        self.dynamic_axes = {n: token_axes(axes) if x.dim() == 2 else {} for n, x in zip(names, inputs)}
        self.max_seq = getattr(config_of(model), "block_size", None)

    @classmethod
    def accepts(cls, model: nn.Module, example: tuple[Any, ...]) -> bool:
        return is_token_input(example[0])

    def more_examples(self) -> list[tuple[torch.Tensor, ...]]:
        """`input_ids` (+ an all-ones `attention_mask`) one row and three tokens longer; none when the
        file takes inputs this spec cannot redraw (`input_1`, ...)."""
        if not self.dynamic_axes.get(self.input_names[0]):
            return []
        if any(n != "attention_mask" for n in self.input_names[1:]):
            return []
        ids = longer_ids(self.model, self.inputs[0], self.dynamic_axes["input_ids"], self.max_seq)
        return [(ids, *(torch.ones_like(ids) for _ in self.input_names[1:]))]
