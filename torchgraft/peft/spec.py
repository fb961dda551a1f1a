"""An adapter spec: the LoRA/DoRA wrappers of a model written as JSON, so a checkpoint describes itself.

The trainer puts `adapter_spec(model)` into every checkpoint's `meta.json` (`model.adapters`), and
`apply_adapter_spec` re-creates exactly those wrappers on a freshly built base model before the
checkpoint's weights are loaded. Layers are grouped by their settings:

    {"groups": [{"layers": ["blocks.0.attn.q_proj", ...], "rank": 8, "alpha": 16.0,
                 "dora": false, "use_rslora": false}]}

A group whose `layers` is null (old runs, PEFT configs) applies to the layers the checkpoint's tensors
carry adapters for.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from torchgraft.peft.lora import _set_submodule, _wrap, apply_lora, lora_layers
from torchgraft.quant.base import QuantizedLinear


def adapter_spec(model: nn.Module) -> dict[str, Any] | None:
    """The spec of `model`'s LoRA/DoRA wrappers (JSON-ready), None when it has none."""
    groups: dict[tuple[int, float, bool, bool, str | None], list[str]] = {}
    for name, layer in lora_layers(model).items():
        quantize = getattr(layer.base_layer, "fmt", None) if isinstance(layer.base_layer, QuantizedLinear) else None
        key = (int(layer.r), float(layer.lora_alpha), bool(layer.use_dora), bool(layer.use_rslora), quantize)
        groups.setdefault(key, []).append(name)
    if not groups:
        return None
    return {"groups": [{"layers": sorted(names), "rank": r, "alpha": a, "dora": d, "use_rslora": rs,
                        **({"quantize": q} if q else {})}
                       for (r, a, d, rs, q), names in groups.items()]}


def apply_adapter_spec(model: nn.Module, spec: dict[str, Any], layers: list[str]) -> None:
    """Wrap `model` as `spec` says; `layers` (the modules the weights carry adapters for) fills groups
    that do not list their layers. The first group goes through `apply_lora` (which freezes the base);
    later groups (different rank/alpha) wrap their layers the same way."""
    import re

    done: set[str] = set()
    for group in spec.get("groups") or []:
        names = [n for n in (group.get("layers") or layers) if n not in done]
        if not names:
            continue
        kw = dict(rank=int(group["rank"]), alpha=float(group["alpha"]), dropout=0.0,
                  dora=bool(group.get("dora")), use_rslora=bool(group.get("use_rslora")))
        if not lora_layers(model):
            apply_lora(model, ["re:" + re.escape(n) for n in names], quantize_base=group.get("quantize"), **kw)
        else:
            for n in names:
                wrapper = _wrap(model.get_submodule(n), **kw)
                _set_submodule(model, n, wrapper)
                for _, p in wrapper.adapter_parameters():
                    p.requires_grad_(True)
        done.update(names)
