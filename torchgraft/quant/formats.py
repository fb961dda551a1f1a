"""Base formats by name: "nf4" -> NF4Linear, "int8" -> Int8Linear (torchao checked on lookup)."""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

from torchgraft.errors import ConfigError
from torchgraft.quant.base import QuantizedLinear, require_torchao

FORMATS = ("nf4", "int8")


def quantizer(fmt: str) -> Callable[[nn.Linear, str], QuantizedLinear]:
    """The quantised-linear class for `fmt`, called as `cls(linear, name)`."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown base quantisation {fmt!r}; use one of {', '.join(FORMATS)}")
    require_torchao(f"a {fmt} base")
    if fmt == "nf4":
        from torchgraft.quant.nf4 import NF4Linear

        return NF4Linear
    from torchgraft.quant.int8 import Int8Linear

    return Int8Linear
