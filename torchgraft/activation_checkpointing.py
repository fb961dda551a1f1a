"""One vocabulary for activation-checkpointing modes, read by `parallelize` (which applies them),
the memory estimate (which counts what they save) and the run config's check (no torch import).

    none | off | false | 0 | False / None   no checkpointing
    full | all | true | 1 | True           every block keeps only its input; recomputed in backward
    k (an integer, or its digits)          every k-th block (blocks 0, k, 2k, ...)
    selective                              every block, but matmul and attention outputs are kept:
                                           only the cheap pointwise ops are recomputed
"""
from __future__ import annotations

from dataclasses import dataclass

from torchgraft.errors import ConfigError

SELECTIVE = "selective"
_OFF = ("none", "off", "false", "")
_FULL = ("full", "true", "all")


@dataclass(frozen=True)
class ACMode:
    """A parsed mode: checkpoint every `every`-th block (0 = off), `selective` = op-level policy."""

    every: int = 0
    selective: bool = False

    @property
    def enabled(self) -> bool:
        return self.every > 0

    def checkpointed(self, n_blocks: int) -> range:
        """Indices of the checkpointed blocks among `n_blocks`."""
        return range(0, n_blocks, self.every) if self.every else range(0)


def parse_ac(value: str | int | bool | None | ACMode, key: str = "activation_checkpointing") -> ACMode:
    """The `ACMode` of a setting (module docstring); anything else is one ConfigError line naming `key`."""
    if isinstance(value, ACMode):
        return value
    if value is None or value is False:
        return ACMode()
    if value is True:
        return ACMode(1)
    if isinstance(value, str):
        word = value.strip().lower()
        if word == SELECTIVE:
            return ACMode(1, selective=True)
        if word in _OFF:
            return ACMode()
        if word in _FULL:
            return ACMode(1)
        if word.isdigit():
            return ACMode(int(word))
    elif isinstance(value, int) and value >= 0:
        return ACMode(value)
    raise ConfigError(f"{key}={value!r} is not valid; use none, full, selective or an integer k >= 0 "
                      "(checkpoint every k-th block)")
