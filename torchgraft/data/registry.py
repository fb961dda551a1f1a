"""Dataset registry: the `data:` section of a run config names a builder registered here.

A builder takes the `data:` mapping (minus `name`) and the run seed and returns a `DataBundle`.
Batches are dicts:
- classification: {"inputs": (B, C, H, W) float, "labels": (B,) long}
- language modelling: {"input_ids": (B, T) long, "labels": (B, T) long, -100 = ignore}
  (optionally "attention_mask": (B, T))
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch.utils.data import Dataset

from torchgraft.errors import ConfigError, did_you_mean

@dataclass
class DataBundle:
    train: Dataset
    val: Dataset | None
    task: str  # the name of the task it feeds (torchgraft.train.tasks.build_task resolves it)
    collate_fn: Callable[[list[Any]], dict[str, Any]] | None = None
    info: dict[str, Any] = field(default_factory=dict)  # e.g. num_classes, vocab_size, tokenizer


_BUILDERS: dict[str, Callable[[dict[str, Any], int], DataBundle]] = {}


def register_dataset(name: str, builder: Callable[[dict[str, Any], int], DataBundle]) -> None:
    _BUILDERS[name] = builder


def build_data(section: dict[str, Any], seed: int = 0) -> DataBundle:
    """Build the data named by `section['name']` with the rest of the section as options."""
    _ensure_loaded()
    opts = dict(section)
    name = opts.pop("name", None)
    if name is None:
        raise ConfigError(f"data section needs `name:` (one of {', '.join(sorted(_BUILDERS))})")
    if name not in _BUILDERS:
        raise ConfigError(f"unknown dataset {name!r}" + did_you_mean(name, _BUILDERS)
                          + f"; known: {', '.join(sorted(_BUILDERS))}")
    return _BUILDERS[name](opts, seed)


def list_datasets() -> list[str]:
    _ensure_loaded()
    return sorted(_BUILDERS)


def _ensure_loaded() -> None:
    """Nothing to import: this module is only reachable through `torchgraft.data`, whose __init__
    imports the built-in dataset modules (they register themselves) before anything runs here."""
