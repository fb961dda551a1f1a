"""Size limits checked by `build` before any work: absurd configs are refused with their size.

- depth: constructing a block costs ~10 ms even on the meta device, so `n_layer=100000` would take
  many minutes before anything fails. Configs deeper than MAX_BLOCKS are refused; their parameter
  count is extrapolated from 1- and 2-block builds on meta (blocks of a zoo model are identical).
- memory: a model built on a real device is first built on meta; if its parameters and buffers need
  more bytes than the device has available, it is refused before anything is allocated.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
from torch import nn

from torchgraft.errors import ConfigError

MAX_BLOCKS = 1024  # the deepest published transformers have ~130 blocks


def fmt_count(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(int(n))


def fmt_bytes(n: float) -> str:
    for unit, div in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{int(n)} B"


def _numel(model: nn.Module) -> int:
    return sum(t.numel() for t in model.parameters()) + sum(b.numel() for b in model.buffers())


_ZERO_MEANS_NONE = {"type_vocab_size"}  # 0 leaves that part out (torchgraft.nn.embedding)


def _is_size_field(name: str) -> bool:
    return name.startswith("n_") or name.endswith(("_size", "_dim", "_chans", "_channels"))


def check_sizes(cfg: Any) -> None:
    """Every integer size of a model config (n_layer, n_head, n_embd, *_size, ...) must be >= 1."""
    if not dataclasses.is_dataclass(cfg):
        return
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if not _is_size_field(f.name) or not isinstance(value, int) or isinstance(value, bool):
            continue
        low = 0 if f.name in _ZERO_MEANS_NONE else 1
        if value < low:
            raise ConfigError(f"model.{f.name} must be >= {low}, got {value}")


def check_depth(fam: Any, cfg: Any) -> None:
    """Refuse `cfg.n_layer > MAX_BLOCKS` with the parameter count such a model would have."""
    depth = getattr(cfg, "n_layer", None)
    if not isinstance(depth, int) or depth <= MAX_BLOCKS:
        return
    sizes = []
    for k in (1, 2):
        with torch.device("meta"):
            sizes.append(_numel(fam.builder(dataclasses.replace(cfg, n_layer=k))))
    n = sizes[0] + (depth - 1) * (sizes[1] - sizes[0])
    raise ConfigError(f"model.n_layer={depth} is more blocks than torchgraft builds (limit {MAX_BLOCKS}): "
                      f"~{fmt_count(n)} parameters, {fmt_bytes(4 * n)} in fp32; use a smaller n_layer")


def available_bytes(device: torch.device) -> int | None:
    """Free memory on `device` (CUDA: mem_get_info; CPU: MemAvailable), None when unknown."""
    if device.type == "cuda" and torch.cuda.is_available():
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except RuntimeError:
            return None
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return None
    return None


def check_fits(model: nn.Module, device: str | torch.device, name: str) -> None:
    """Refuse to materialise a meta-device `model` on `device` when its tensors exceed free memory."""
    dev = torch.device(device)
    free = available_bytes(dev)
    if free is None:
        return
    need = sum(t.numel() * t.element_size() for t in model.parameters()) + \
        sum(b.numel() * b.element_size() for b in model.buffers())
    if need > free:
        raise ConfigError(f"model {name} needs {fmt_bytes(need)} for its weights alone "
                          f"({fmt_count(_numel(model))} values) but {dev} has {fmt_bytes(free)} free; "
                          "use a smaller config, or build on device='meta' to inspect it")
