"""What a Hugging Face family mapping is made of: tensor `Rule`s and an `HFSpec` per family.

A `Rule` ties one or more Hugging Face tensors to one or more torchgraft tensors with a pair of
pure functions (`to_ours`, `to_hf`), e.g. GPT-2's fused, transposed `c_attn` <-> `q_proj`,
`k_proj`, `v_proj`. The functions work on any device, including meta (used to learn shapes before
writing). Each family file (`hf_gpt2.py`, `hf_llama.py`, `hf_bert.py`) lists its rules as a table.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from torchgraft.errors import ConfigError

Tensors = tuple[torch.Tensor, ...]


def same(*xs: torch.Tensor) -> Tensors:
    return xs


def transpose(*xs: torch.Tensor) -> Tensors:
    """Conv1D (in, out) <-> Linear (out, in); its own inverse."""
    return tuple(x.t().contiguous() for x in xs)


@dataclass(frozen=True)
class Rule:
    """`hf` tensors <-> `ours` tensors. Identity 1:1 copy unless `to_ours`/`to_hf` say otherwise."""
    hf: tuple[str, ...]
    ours: tuple[str, ...]
    to_ours: Callable[..., Tensors] = same
    to_hf: Callable[..., Tensors] = same


def copy(hf: str, ours: str) -> Rule:
    return Rule((hf,), (ours,))


def linear(hf: str, ours: str) -> list[Rule]:
    """`hf.{weight,bias}` -> `ours.{weight,bias}` (Linear, LayerNorm). A bias rule whose torchgraft
    tensor does not exist (bias-free model) is dropped by the engine."""
    return [copy(f"{hf}.weight", f"{ours}.weight"), copy(f"{hf}.bias", f"{ours}.bias")]


@dataclass(frozen=True)
class HFSpec:
    """One Hugging Face model family <-> one torchgraft family.

    - `config_from_hf(hf_config, architecture) -> our config fields` (raise ConfigError for
      settings our model cannot reproduce),
    - `config_to_hf(our_config) -> (architecture, HF config fields)`,
    - `rules(our_config, prefix, architecture) -> [Rule]`: the tensor table,
    - `prefixes[architecture]`: where the base model's tensors live in the file (candidates, in
      order; the first is used when writing), detected on import with `anchor`,
    - `derived`: regexes of HF tensors skipped on import when no rule consumed them: buffers our
      model recomputes, and a tied model's duplicate `lm_head.weight`,
    - `from_tensors(fields, tensor_names, prefix) -> fields`: optional config fix-up from the file.
    """
    model_type: str
    family: str
    architectures: tuple[str, ...]
    config_from_hf: Callable[[dict[str, Any], str], dict[str, Any]]
    config_to_hf: Callable[[Any], tuple[str, dict[str, Any]]]
    rules: Callable[[Any, str, str], list[Rule]]
    prefixes: dict[str, tuple[str, ...]]
    anchor: str
    derived: tuple[str, ...] = field(default_factory=tuple)
    # optional: adjust config fields to what the file holds (e.g. BERT without a pooler)
    from_tensors: Callable[[dict[str, Any], set[str], str], dict[str, Any]] | None = None


def need(hf: dict[str, Any], key: str, arch: str) -> Any:
    """hf[key], or a ConfigError naming the missing field."""
    if hf.get(key) is None:
        raise ConfigError(f"config.json of this {arch} has no {key!r}; the file is incomplete")
    return hf[key]


def check_equal(hf: dict[str, Any], key: str, supported: Any, arch: str, default: Any = None) -> None:
    """ConfigError unless hf.get(key, default) == supported."""
    value = hf.get(key, default)
    if value is None:
        value = default
    if value != supported:
        raise ConfigError(f"{arch} with {key}={value!r} is not supported by torchgraft "
                          f"(only {supported!r})")
