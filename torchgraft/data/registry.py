"""Dataset registry: the `data:` section of a run config names a builder registered here.

A builder takes the `data:` mapping (minus `name`) and the run seed and returns a `DataBundle`.
Batches are dicts:
- classification: {"inputs": (B, C, H, W) float, "labels": (B,) long}
- language modelling: {"input_ids": (B, T) long, "labels": (B, T) long, -100 = ignore}
  (optionally "attention_mask": (B, T) padding or (B, 1, T, T) per-document, "position_ids": (B, T))
- sequence classification: {"input_ids": (B, T), "attention_mask": (B, T), "labels": (B,)}
  (optionally "token_type_ids": (B, T) for text pairs)

Besides its datasets a bundle may carry `files` (name -> content) that the run writes into its run
directory (e.g. `labels.json`, the chat template), and `num_workers` for decoding in DataLoader
worker processes. A dataset that can turn raw user inputs (image paths, strings) into a batch for
`torchgraft predict` registers an encoder with `register_encoder`.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from torch.utils.data import Dataset

from torchgraft.errors import ConfigError, did_you_mean

TaskSpec = Union[str, dict[str, Any]]  # a task name or {name: ..., **options} (see train/tasks)


@dataclass
class DataBundle:
    train: Dataset
    val: Dataset | None
    task: TaskSpec
    collate_fn: Callable[[list[Any]], dict[str, Any]] | None = None
    info: dict[str, Any] = field(default_factory=dict)  # e.g. num_classes, vocab_size, tokenizer
    files: dict[str, str | bytes] = field(default_factory=dict)  # written into the run dir (relative names)
    num_workers: int = 0  # DataLoader worker processes for the training/eval loaders


Encoder = Callable[[list[str]], dict[str, Any]]  # raw inputs (paths / strings) -> a model batch


LABELS_FILE = "labels.json"  # class names of a classification run, in class-index order


def read_labels(run_dir: str | Path) -> list[str]:
    """The class names a classification run saved (`RUN_DIR/labels.json`)."""
    from torchgraft.outputs import check_input_file

    p = check_input_file(Path(run_dir) / LABELS_FILE, "class names file",
                         "only classification runs on images/textclass data save class names; train one, "
                         "or give the run directory of one")
    try:
        labels = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p} is not valid JSON ({str(e).splitlines()[0]}); it should be the list of class "
                          "names the run saved") from None
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise ConfigError(f"{p} must be a JSON list of class names (strings), got {type(labels).__name__}")
    return labels


_BUILDERS: dict[str, Callable[[dict[str, Any], int], DataBundle]] = {}


def register_dataset(name: str, builder: Callable[[dict[str, Any], int], DataBundle]) -> None:
    _BUILDERS[name] = builder


_ENCODERS: dict[str, tuple[Callable[[dict[str, Any], Any], Encoder], str]] = {}


def register_encoder(name: str, factory: Callable[[dict[str, Any], Any], Encoder], task: str) -> None:
    """`factory(data_options, run_dir) -> encode(inputs) -> batch` for dataset `name`, whose batches
    `task` (a registered task name) feeds to the model; used by `torchgraft predict`."""
    _ENCODERS[name] = (factory, task)


def build_encoder(section: dict[str, Any], run_dir: Any) -> tuple[Encoder, str]:
    """(input encoder, task name) of the dataset named in a run's `data:` section."""
    _ensure_loaded()
    opts = dict(section)
    name = opts.pop("name", None)
    if name not in _ENCODERS:
        raise ConfigError(f"runs on dataset {name!r} cannot predict on raw inputs (predict works for "
                          f"runs on: {', '.join(sorted(_ENCODERS))})")
    factory, task = _ENCODERS[name]
    return factory(opts, run_dir), task


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
