"""The built-in export input kinds, one file each, with priorities below a new kind's 0, from the most
specific to the most general: text-pair, tokens, image, tensors (accepts anything), and the decode step (chosen by `kv_cache=True` / `--kv-cache` or `spec="decode-step"`, never automatically).
The lookups by name, by inputs and by file kind are here, so they always see the built-ins."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from torchgraft.errors import ConfigError
from torchgraft.interop.export_spec import EXPORT_SPECS, ExportSpec
from torchgraft.interop.export_specs.tensors import TensorsSpec  # noqa: F401  (registration order matters)
from torchgraft.interop.export_specs.image import ImageSpec  # noqa: F401
from torchgraft.interop.export_specs.tokens import TokenSpec  # noqa: F401
from torchgraft.interop.export_specs.text_pair import TextPairSpec  # noqa: F401
from torchgraft.interop.export_specs.decode_step import DecodeStep, DecodeStepSpec, is_decoder_lm  # noqa: F401


def get_spec(spec: str | type[ExportSpec]) -> type[ExportSpec]:
    """A spec class by registered name (or the class itself)."""
    if isinstance(spec, type) and issubclass(spec, ExportSpec):
        return spec
    if spec not in EXPORT_SPECS:
        raise ConfigError(f"unknown export spec {spec!r}; use one of {', '.join(sorted(EXPORT_SPECS))}")
    return EXPORT_SPECS[spec]


def choose_spec(model: nn.Module, example: tuple[Any, ...]) -> type[ExportSpec]:
    """The first registered spec, highest `priority` first and then the newest, that accepts `model`
    traced on `example` (the `tensors` spec accepts any tuple of tensors)."""
    if not example or not all(torch.is_tensor(x) for x in example):
        raise ConfigError("example must be a tensor or a tuple of tensors (the positional inputs of forward)")
    order = sorted(reversed(list(EXPORT_SPECS.values())), key=lambda c: -c.priority)  # stable: newest first
    for cls in order:
        if cls.accepts(model, example):
            return cls
    raise ConfigError(f"no export spec accepts the inputs of {type(model).__name__}; pass spec=NAME")


def spec_for_kind(kind: str) -> type[ExportSpec]:
    """The first registered spec of a file `kind` ("logits", "decode_step"): what `eager_module`
    needs to rebuild the module of a file from its kind and input names."""
    for cls in EXPORT_SPECS.values():
        if cls.kind == kind:
            return cls
    raise ConfigError(f"unknown export kind {kind!r}")


def eager_module(model: nn.Module, kind: str, input_names: Sequence[str]) -> nn.Module:
    """The module whose flat positional inputs are an exported file's inputs, in order (the file's
    `kind` and input names as in `ExportResult` or its metadata): `DecodeStep` for a decode step,
    else `model` with `attention_mask` / `token_type_ids` by keyword."""
    return spec_for_kind(kind).module_for(model, input_names)
