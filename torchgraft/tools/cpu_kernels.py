"""The `cpu-kernels` converter: swaps plain layers for the measured CPU rewrites of
`torchgraft.nn.cpu_kernels` (few-row decode products, the embedding's ATen backward, GELU-tanh in
sigmoid form), keeping parameters, state-dict names and results up to float rounding.

Who applies it (the model code never does): the training engine when `trainer.compile` is on and
the model trains on CPU (`kernel_converters(device, compile=True)`), and the static-cache decoders
(`StaticDecoder`, the serve `SlotDecoder`) for generation on CPU. Only exact `nn.Linear`,
`nn.Embedding`, `nn.GELU(approximate="tanh")` and `TiedLinear` are swapped: subclasses (quantised
linears, adapters' own layers) are someone else's rewrite and are left alone (an adapter's inner
base `nn.Linear` is swapped like any other).
"""
from __future__ import annotations

import torch
from torch import nn

from torchgraft.nn.cpu_kernels import ATenGradEmbedding, DecodeLinear, DecodeTiedLinear, SigmoidGELUTanh
from torchgraft.nn.linear import TiedLinear
from torchgraft.tools.converters import (ModuleConverter, Skip, SwapConverter, has_hooks, register_converter, skip,
                                         take_state)

NAME = "cpu-kernels"


def _meta_empty(module: type[nn.Module], *args: object, **kwargs: object) -> nn.Module:
    """`module(*args, **kwargs)` built on meta (no memory, no RNG draw), for `take_state` to fill."""
    with torch.device("meta"):
        return module(*args, **kwargs)


def cpu_kernel_swap(name: str, m: nn.Module) -> nn.Module | Skip | None:
    """The CPU rewrite of `m`, or None to keep it (see the module docstring)."""
    t = type(m)
    if t in (nn.Linear, nn.Embedding, nn.GELU, TiedLinear) and has_hooks(m):
        return skip("has hooks of its own")
    if t is nn.Linear:
        new = _meta_empty(DecodeLinear, m.in_features, m.out_features, bias=m.bias is not None)
        return take_state(new, m)
    if t is nn.Embedding:
        if m.max_norm is not None or m.sparse or m.scale_grad_by_freq:
            return skip("max_norm / sparse / scale_grad_by_freq keep nn.Embedding's own path")
        new = _meta_empty(ATenGradEmbedding, m.num_embeddings, m.embedding_dim, padding_idx=m.padding_idx)
        return take_state(new, m)
    if t is nn.GELU and m.approximate == "tanh":
        return SigmoidGELUTanh()
    if t is TiedLinear:
        return DecodeTiedLinear()
    return None


@register_converter(NAME)
def cpu_kernels() -> ModuleConverter:
    """The converter (no options)."""
    return SwapConverter(NAME, cpu_kernel_swap)


def kernel_converters(device: torch.device | str) -> list[ModuleConverter]:
    """The kernel converters worth applying for work on `device` (compiled training, decoding):
    `cpu-kernels` on CPU, none elsewhere (the rewrites were measured on CPU only)."""
    return [cpu_kernels()] if torch.device(device).type == "cpu" else []
