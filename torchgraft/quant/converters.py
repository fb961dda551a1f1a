"""The quantised-base converters: `nf4` and `int8` swap frozen nn.Linear layers for `NF4Linear` /
`Int8Linear` (names kept), `dequantize_model` swaps them back to nn.Linear (for merging / export).

    quantize_linears(model, "nf4", targets=["q_proj", "v_proj"])   # or build_converter("nf4", targets=...)
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from torchgraft.errors import ConfigError
from torchgraft.quant.base import QuantizedLinear
from torchgraft.quant.formats import quantizer
from torchgraft.tools.converters import ConversionReport, register_converter, skip, swap_modules

def shared_weights(model: nn.Module) -> set[int]:
    """ids of weights used by more than one module (a tied embedding / LM head)."""
    seen: dict[int, int] = {}
    for m in model.modules():
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor):
            seen[id(w)] = seen.get(id(w), 0) + 1
    return {k for k, n in seen.items() if n > 1}


def linear_swap(model: nn.Module, fmt: str, match: Callable[[str], bool]):
    """The swap function of converter `fmt`: matching nn.Linear layers become quantised."""
    make = quantizer(fmt)
    tied = shared_weights(model)

    def swap(name: str, m: nn.Module):
        if not isinstance(m, nn.Linear) or not match(name):
            return None
        if id(m.weight) in tied:
            return skip("weight tied to another module")
        if m.weight.device.type == "meta":
            return skip("weights not loaded (meta)")
        return make(m, name)

    return swap


def quantize_linears(model: nn.Module, fmt: str = "nf4", targets: Iterable[str] | None = None) -> ConversionReport:
    """Quantise, in place, the nn.Linear layers whose names match `targets` (PEFT-style patterns,
    default all) to `fmt`, frozen. Raises ConfigError when nothing was quantised."""
    from torchgraft.peft.lora import target_matches  # deferred: peft.lora imports quant.base

    pats = list(targets) if targets is not None else None
    match = (lambda n: True) if pats is None else (lambda n: any(target_matches(n, t) for t in pats))
    report = ConversionReport(fmt)
    swap_modules(model, linear_swap(model, fmt, match), report)
    if not report.swapped:
        why = f" ({next(iter(report.skipped.items()))})" if report.skipped else ""
        raise ConfigError(f"{fmt}: the model has no nn.Linear layer to quantise{why}; QLoRA needs linear "
                          "layers (use method lora for convolution-only models)")
    return report


@dataclass
class QuantizeConverter:
    """Converter `nf4` / `int8`: quantise the matching nn.Linear layers (default all)."""

    name: str
    targets: list[str] | None = None

    def convert(self, model: nn.Module) -> ConversionReport:
        return quantize_linears(model, self.name, self.targets)


@register_converter("nf4")
def _nf4(targets: list[str] | None = None) -> QuantizeConverter:
    return QuantizeConverter("nf4", targets)


@register_converter("int8")
def _int8(targets: list[str] | None = None) -> QuantizeConverter:
    return QuantizeConverter("int8", targets)


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> ConversionReport:
    """Swap every quantised linear for a plain nn.Linear with its dequantised weight (in `dtype`,
    default the layer's compute dtype), in place."""
    report = ConversionReport("dequantize")
    swap_modules(model, lambda n, m: m.to_linear(dtype) if isinstance(m, QuantizedLinear) else None, report)
    return report
