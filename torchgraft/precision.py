"""One vocabulary for numeric precision: a name -> which dtype weights are stored, computed and
reduced in. The trainer's autocast (`trainer.precision`), FSDP's mixed-precision policy
(`distributed.mixed_precision`) and the memory estimate (`torchgraft inspect --precision`) all read
this table, so a name means the same thing everywhere.

    name        param   compute  reduce    (param: stored weights, gradients and optimizer states)
    fp32        fp32    fp32     fp32
    bf16        fp32    bf16     fp32      mixed: fp32 master weights, bf16 autocast / all-gather
    fp16        fp32    fp16     fp32      mixed, with a gradient scaler against underflow
    bf16-true   bf16    bf16     bf16      everything 16-bit
    fp16-true   fp16    fp16     fp16

Aliases (as in Lightning and PyTorch): bf16-mixed, fp16-mixed, bfloat16, float16, float32, and none
(no mixed precision = fp32). The names are checked without importing torch (`check_precision`), so a
config error stays instant; `precision(name)` gives the dtypes.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from torchgraft.errors import ConfigError, did_you_mean

if TYPE_CHECKING:
    import torch

# name -> (param, compute, reduce) dtype names
_TABLE: dict[str, tuple[str, str, str]] = {
    "fp32": ("float32", "float32", "float32"),
    "bf16": ("float32", "bfloat16", "float32"),
    "fp16": ("float32", "float16", "float32"),
    "bf16-true": ("bfloat16", "bfloat16", "bfloat16"),
    "fp16-true": ("float16", "float16", "float16"),
}
ALIASES: dict[str, str] = {"bf16-mixed": "bf16", "fp16-mixed": "fp16", "bfloat16": "bf16", "float16": "fp16",
                           "float32": "fp32", "none": "fp32"}
NAMES: tuple[str, ...] = (*_TABLE, *ALIASES)


@dataclass(frozen=True)
class Precision:
    """The dtypes of one precision setting (see the module docstring)."""

    name: str             # the canonical name (fp32, bf16, fp16, bf16-true, fp16-true)
    param: torch.dtype    # stored weights, gradients, optimizer states
    compute: torch.dtype  # autocast / FSDP's all-gathered parameters; activations are kept in it
    reduce: torch.dtype   # gradient reduction across processes

    @property
    def mixed(self) -> bool:
        """Computes in a lower precision than it stores (autocast / FSDP mixed precision)."""
        return self.compute != self.param

    @property
    def activation(self) -> torch.dtype:
        """The dtype saved activations have (= compute)."""
        return self.compute

    @property
    def needs_grad_scaler(self) -> bool:
        """fp16 gradients underflow without loss scaling; bf16 and fp32 do not."""
        import torch

        return self.compute == torch.float16


def canonical_name(name: str) -> str | None:
    """The table's name for `name` (aliases resolved, case and spaces ignored), None if unknown."""
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    return key if key in _TABLE else None


def check_precision(name: str, key: str = "precision") -> str:
    """The canonical name of `name`, or one ConfigError line naming `key` and the valid names (no torch)."""
    found = canonical_name(name)
    if found is None:
        raise ConfigError(f"{key}={name!r} is not a precision" + did_you_mean(str(name).strip().lower(), NAMES)
                          + f"; use one of {', '.join(NAMES)}")
    return found


def check_fp32_master(name: str, key: str = "precision") -> str:
    """`check_precision` restricted to the names that keep fp32 master weights (fp32, bf16, fp16 and
    their aliases): what autocast and FSDP's mixed-precision policy can do to an fp32 model."""
    found = check_precision(name, key)
    if _TABLE[found][0] != "float32":
        raise ConfigError(f"{key}={name!r} would store the weights in 16 bits; this setting keeps fp32 master "
                          f"weights and computes in 16 bits: use {found.removesuffix('-true')} (mixed) or none")
    return found


@lru_cache(maxsize=None)
def _build(canonical: str) -> Precision:
    import torch

    param, compute, reduce = (getattr(torch, n) for n in _TABLE[canonical])
    return Precision(canonical, param, compute, reduce)


def precision(name: str, key: str = "precision") -> Precision:
    """The `Precision` of a name (ConfigError naming `key` for an unknown one)."""
    return _build(check_precision(name, key))
