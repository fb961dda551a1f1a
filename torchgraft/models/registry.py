"""Model registry: families (a Config dataclass + a builder) and named presets (field values).

Builders are separate from presets (torchtune style): `register_family("gpt", GPTConfig, GPT)`
once, then `register_preset("gpt2", "gpt", n_layer=12, ...)` per size.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchgraft.config import apply_overrides, from_dict, load_yaml, to_dict
from torchgraft.errors import ConfigError, did_you_mean
from torchgraft.nn.init import SkipInitOnMeta


@dataclass(frozen=True)
class Family:
    name: str
    config_cls: type
    builder: Callable[[Any], nn.Module]


@dataclass(frozen=True)
class Preset:
    name: str
    family: str
    fields: dict[str, Any] = field(default_factory=dict)
    description: str = ""


_FAMILIES: dict[str, Family] = {}
_PRESETS: dict[str, Preset] = {}


def register_family(name: str, config_cls: type, builder: Callable[[Any], nn.Module]) -> None:
    """Register a model family: `builder(config) -> nn.Module`."""
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"config class for family {name!r} must be a dataclass")
    _FAMILIES[name] = Family(name, config_cls, builder)


def register_preset(name: str, family: str, description: str = "", **fields: Any) -> None:
    """Register a named size/variant of `family`; fields are validated against its Config now."""
    if family not in _FAMILIES:
        raise KeyError(f"unknown family {family!r}; register it first")
    from_dict(_FAMILIES[family].config_cls, fields, prefix=name)  # validate eagerly
    _PRESETS[name] = Preset(name, family, dict(fields), description)


def list_models() -> list[str]:
    """Names of all registered presets, sorted."""
    _ensure_loaded()
    return sorted(_PRESETS)


def list_families() -> list[str]:
    _ensure_loaded()
    return sorted(_FAMILIES)


def get_preset(name: str) -> Preset:
    _ensure_loaded()
    if name not in _PRESETS:
        raise ConfigError(f"unknown model {name!r}" + did_you_mean(name, _PRESETS)
                          + "; run `torchgraft models` to list them")
    return _PRESETS[name]


def family_of_config(cfg: Any) -> Family:
    _ensure_loaded()
    for fam in _FAMILIES.values():
        if type(cfg) is fam.config_cls:
            return fam
    raise ConfigError(f"{type(cfg).__name__} is not a registered model config")


def get_family(name: str) -> Family:
    _ensure_loaded()
    if name not in _FAMILIES:
        raise ConfigError(f"unknown model family {name!r}" + did_you_mean(name, _FAMILIES))
    return _FAMILIES[name]


def resolve_config(spec: str | Path | dict[str, Any] | Any, **overrides: Any) -> tuple[str, Any]:
    """Turn a preset name, a YAML path, a mapping `{name: preset, field: value}` or a Config
    instance (plus dotted overrides) into `(preset_or_family_name, config)`."""
    _ensure_loaded()
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        fam = family_of_config(spec)
        tree = apply_overrides(to_dict(spec), overrides)
        return fam.name, from_dict(fam.config_cls, tree, prefix="model")
    if isinstance(spec, Path) or (isinstance(spec, str) and spec.endswith((".yaml", ".yml"))):
        data = load_yaml(spec)
        data = data.get("model", data) if isinstance(data.get("model"), dict) else data
        return resolve_config(data, **overrides)
    if isinstance(spec, dict):
        tree = dict(spec)
        name = tree.pop("name", None) or tree.pop("preset", None)
        family = tree.pop("family", None)
        if name is None and family is None:
            raise ConfigError("model section needs `name: <preset>` (or `family: <family>`); "
                              "run `torchgraft models` to list presets")
        if name is not None:
            preset = get_preset(name)
            fam = _FAMILIES[preset.family]
            base = dict(preset.fields)
        else:
            fam = get_family(family)
            base, name = {}, family
        merged = apply_overrides(base, {**tree, **overrides})
        return name, from_dict(fam.config_cls, merged, prefix="model")
    if isinstance(spec, str):
        return resolve_config({"name": spec}, **overrides)
    raise ConfigError(f"cannot build a model from {type(spec).__name__}")


def get_config(spec: str | Path | dict[str, Any] | Any, **overrides: Any) -> Any:
    """The validated Config dataclass for a preset name / YAML / mapping / config, with overrides."""
    return resolve_config(spec, **overrides)[1]


def build(spec: str | Path | dict[str, Any] | Any, *, device: str | torch.device | None = None,
          **overrides: Any) -> nn.Module:
    """Build a registered model.

    `build("gpt2", n_layer=4)`, `build("cfg.yaml")`, `build(GPTConfig(...))`.
    With `device="meta"` nothing is allocated (call `materialize` later); otherwise the model is
    built on meta, then materialized on `device` (default CPU) with its `init_weights`.
    The model gets `.config` (its Config) and `.model_name` (preset or family name).
    """
    from torchgraft.models.limits import check_depth, check_fits, check_sizes

    name, cfg = resolve_config(spec, **overrides)
    fam = family_of_config(cfg)
    check_sizes(cfg)
    check_depth(fam, cfg)  # absurd depths refused with their size before minutes of construction
    with torch.device("meta"), SkipInitOnMeta():  # values come with `materialize`
        try:
            model = fam.builder(cfg)
        except RuntimeError as e:  # e.g. a size torch refuses; the config is at fault, not the code
            raise ConfigError(f"model {name}: this config cannot be built ({str(e).splitlines()[0]})") from None
    model.config = cfg
    model.model_name = name
    if device is None or torch.device(device).type != "meta":
        check_fits(model, device or "cpu", name)  # refused with its size before allocating
        materialize(model, device or "cpu")
    return model


@torch.no_grad()
def materialize(model: nn.Module, device: str | torch.device = "cpu") -> nn.Module:
    """Allocate a meta-device model on `device` and initialise it.

    Runs `reset_parameters()` on every submodule that has one (standard layers, buffers such as
    RoPE tables), then `init_weights()` on submodules that define it, innermost first, so the
    model's own scheme wins. Works on any nn.Module.
    """
    model.to_empty(device=device)
    modules = list(model.modules())
    for m in modules:
        if hasattr(m, "reset_parameters") and callable(m.reset_parameters):
            m.reset_parameters()
    for m in reversed(modules):
        if hasattr(m, "init_weights") and callable(m.init_weights):
            m.init_weights()
    return model




def _ensure_loaded() -> None:
    """Nothing to import: this module is only reachable through `torchgraft.models`, whose __init__
    imports every family module (they register themselves) first; an import here was a cycle."""
