"""Module converters: rewrite a built model by swapping its modules, from outside the model code.

Model code uses plain `nn.Linear` / `nn.Embedding` (it reads like nanoGPT). A rewrite that only pays
off in some settings (the measured CPU decode kernels, a quantised NF4 / int8 base for QLoRA) is a
converter applied to the built model, as torchtitan's model converters are: the engine applies the
ones a run asks for, generation applies its own, and the model file never learns about them.

A converter has a `name` and `convert(model) -> ConversionReport`. Most are a `SwapConverter`: a
function that, given a module's dotted name and the module, returns its replacement or None to keep
it (`skip(reason)` keeps it and says why). Replacements must keep parameter and buffer names, so
state dicts, optimizers and adapters see the same model. New converters register with
`register_converter(name)` and are built by name from configs (`build_converter(name, **options)`).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from torch import nn

from torchgraft.errors import ConfigError


@dataclass
class ConversionReport:
    """What one converter did: the modules it replaced and the ones it left, with the reason."""

    converter: str
    swapped: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        text = f"{self.converter}: {len(self.swapped)} module(s) converted"
        if self.skipped:
            text += f", {len(self.skipped)} left (" + "; ".join(f"{k}: {v}" for k, v in list(self.skipped.items())[:3])
            text += ", ..." if len(self.skipped) > 3 else ""
            text += ")"
        return text


@runtime_checkable
class ModuleConverter(Protocol):
    name: str

    def convert(self, model: nn.Module) -> ConversionReport: ...


class Skip:
    """Returned by a swap function to keep a module and record why."""

    __slots__ = ("reason",)

    def __init__(self, reason: str):
        self.reason = reason


def skip(reason: str) -> Skip:
    return Skip(reason)


SwapFn = Callable[[str, nn.Module], "nn.Module | Skip | None"]


def has_hooks(m: nn.Module) -> bool:
    """Whether `m` carries its own forward/backward hooks (a swap would drop them: skip such modules)."""
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def take_state(new: nn.Module, old: nn.Module) -> nn.Module:
    """`new` (built empty, e.g. on meta) holding `old`'s very parameters and buffers (shared, not
    copied, so optimizers and tied weights still see them) and its train/eval mode; returns `new`."""
    for name, p in old.named_parameters(recurse=False):
        setattr(new, name, p)
    for name, b in old.named_buffers(recurse=False):
        new.register_buffer(name, b, persistent=name not in old._non_persistent_buffers_set)
    return new.train(old.training)


def swap_modules(model: nn.Module, swap: SwapFn, report: ConversionReport) -> nn.Module:
    """Replace, in place, every submodule for which `swap(name, module)` returns a module; replaced
    modules are not descended into. The root itself is never replaced. Returns `model`."""

    def visit(parent: nn.Module, prefix: str) -> None:
        for child_name, child in list(parent.named_children()):
            name = f"{prefix}{child_name}"
            new = swap(name, child)
            if isinstance(new, Skip):
                report.skipped[name] = new.reason
            elif new is not None and new is not child:
                setattr(parent, child_name, new)
                report.swapped.append(name)
                continue
            visit(child, name + ".")

    visit(model, "")
    return model


@dataclass
class SwapConverter:
    """A converter made of one swap function (see `swap_modules`)."""

    name: str
    swap: SwapFn

    def convert(self, model: nn.Module) -> ConversionReport:
        report = ConversionReport(self.name)
        swap_modules(model, self.swap, report)
        return report


_REGISTRY: dict[str, Callable[..., ModuleConverter]] = {}


def register_converter(name: str) -> Callable[[Callable[..., ModuleConverter]], Callable[..., ModuleConverter]]:
    """Decorator: register a converter factory under `name` (its keyword arguments are the options)."""

    def deco(factory: Callable[..., ModuleConverter]) -> Callable[..., ModuleConverter]:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"converter {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return deco


def list_converters() -> list[str]:
    return sorted(_REGISTRY)


def build_converter(name: str, **options: object) -> ModuleConverter:
    """The registered converter `name`, built with `options` (a typo in an option is an error)."""
    if name not in _REGISTRY:
        known = ", ".join(list_converters()) or "none registered"
        raise ConfigError(f"unknown converter {name!r}; known: {known}")
    try:
        return _REGISTRY[name](**options)
    except TypeError as e:
        raise ConfigError(f"converter {name!r}: {e}") from None


def apply_converters(model: nn.Module, converters: Sequence[ModuleConverter]) -> list[ConversionReport]:
    """Apply converters in order (each sees the previous one's result); their reports, in order."""
    return [c.convert(model) for c in converters]
