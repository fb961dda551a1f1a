"""What an exported file takes and returns: `ExportSpec`, one class per input kind, and their registry.

Shaped after optimum's `OnnxConfig`: a spec knows its input and output names, their dynamic axes, the
example it is traced with (`example()`), inputs at other sizes that prove the axes are dynamic
(`more_examples()`), the module whose flat positional inputs are the file's inputs (`eager_module()`)
and what it adds to the file's metadata (`metadata()`). `export()` chooses a spec, traces its module,
writes the file and checks it; it never tests what kind of model it has.

The built-in kinds live in `torchgraft/interop/export_specs/` (tensors, image, tokens, text-pair,
decode-step). A new input kind is a new `ExportSpec` subclass plus `register_export_spec` (see
docs/architecture.md, "Adding an export input kind"); `export(spec=NAME)` / `--spec NAME` picks one
by name, otherwise the first registered spec, highest `priority` first, whose `accepts(model,
example)` is true (the built-ins are below 0, so a new kind is tried before them; the lookups are in
`export_specs/__init__.py`, which imports the built-ins).
"""
from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from torchgraft.errors import ConfigError

DYNAMIC_AXES = ("batch", "seq")  # the axes a user can ask for (`dynamic=`, `--dynamic`)
KEYWORD_INPUTS = ("attention_mask", "token_type_ids", "position_ids")  # passed to forward by keyword


# ---- what specs read from a model ------------------------------------------------------------------
def config_of(model: nn.Module) -> Any:
    """The zoo Config of a model (or of a `TaskModel`'s backbone), else None."""
    for m in (model, getattr(model, "backbone", None)):
        cfg = getattr(m, "config", None)
        if dataclasses.is_dataclass(cfg):
            return cfg
    return None


def model_device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def takes(model: nn.Module, name: str) -> bool:
    """Whether `model.forward` has a parameter called `name`."""
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def is_token_input(x: Any) -> bool:
    return torch.is_tensor(x) and x.dim() == 2 and not x.dtype.is_floating_point and x.dtype != torch.bool


def random_like(model: nn.Module, inputs: Sequence[torch.Tensor], seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random tensors with the shapes/dtypes/devices of `inputs`: normal floats, token ids below the
    model's `vocab_size` (or below the inputs' own maximum + 1), bools kept."""
    gen = torch.Generator().manual_seed(seed)
    vocab = getattr(config_of(model), "vocab_size", None)
    out = []
    for x in inputs:
        if x.dtype.is_floating_point:
            out.append(torch.randn(x.shape, generator=gen).to(x))
        elif x.dtype == torch.bool:
            out.append(x.clone())
        else:
            high = vocab or int(x.max()) + 1 if x.numel() else 1
            out.append(torch.randint(0, max(1, high), x.shape, generator=gen).to(x))
    return tuple(out)


def example_inputs(model: nn.Module, batch_size: int = 2, seq_len: int | None = 8) -> tuple[torch.Tensor, ...]:
    """Positional example inputs of `model.forward` for a batch, with random values.

    The shapes come from the model (`torchgraft.tools.meta.example_inputs`: its declared
    `parts().example_inputs`, else its config's forward contract); the values are redrawn at random
    (token ids below `vocab_size`, normal floats) so that `check` compares on real data, not zeros.
    A user's own module declares none: pass `example` to `export`.
    """
    from torchgraft.tools.meta import example_inputs as declared_inputs

    shapes = declared_inputs(model, batch_size, seq_len, device=model_device(model))
    if shapes is None:
        raise ConfigError(f"cannot make example inputs for {type(model).__name__} (it declares none and has "
                          "no zoo config); pass example=(tensor, ...) with the inputs of its forward")
    return random_like(model, shapes)


def wanted_axes(dynamic: bool | str | Sequence[str] | Mapping[str, Any] | None) -> set[str]:
    """The dynamic axes asked for: True/None = batch and seq, False/"none" = none, "batch,seq", [...].
    A mapping names the axes itself (`named_axes`), so it asks for none of the defaults."""
    if isinstance(dynamic, Mapping):
        return set()
    if dynamic is None or dynamic is True:
        return set(DYNAMIC_AXES)
    if dynamic is False:
        return set()
    items = [dynamic] if isinstance(dynamic, str) else list(dynamic)
    items = [s.strip() for x in items for s in str(x).split(",") if s.strip()]
    if items in (["none"], ["static"]):
        return set()
    bad = [a for a in items if a not in DYNAMIC_AXES]
    if bad:
        raise ConfigError(f"unknown dynamic axis {bad[0]!r}; use batch, seq, 'batch,seq' or none")
    return set(items)


def named_axes(dynamic: Mapping[str, Mapping[int, str]], input_names: Sequence[str]) -> dict[str, dict[int, str]]:
    """`dynamic={input name: {axis: dim name}}` checked against the spec's inputs."""
    axes_in = {str(k): {int(a): str(n) for a, n in v.items()} for k, v in dynamic.items()}
    unknown = [k for k in axes_in if k not in input_names]
    if unknown:
        raise ConfigError(f"dynamic axes name unknown input {unknown[0]!r}; inputs are {', '.join(input_names)}")
    return {n: axes_in.get(n, {}) for n in input_names}


# ---- the module that fixes the exported signature --------------------------------------------------
class FlatInputs(nn.Module):
    """`model(*positional, **keywords)` from one flat tuple of tensors, so the file's input names and
    dynamic axes line up one-to-one with the graph inputs. Inputs named in `KEYWORD_INPUTS`
    (`attention_mask`, `token_type_ids`, ...) come last and are passed by keyword; a `.logits`
    output (HF-style) is unwrapped."""

    def __init__(self, model: nn.Module, input_names: Sequence[str]):
        super().__init__()
        self.model = model
        self.keywords = tuple(n for n in input_names if n in KEYWORD_INPUTS)
        self.n_positional = len(input_names) - len(self.keywords)

    def forward(self, *inputs: torch.Tensor) -> Any:
        pos, kw = inputs[: self.n_positional], inputs[self.n_positional:]
        out = self.model(*pos, **dict(zip(self.keywords, kw)))
        return out.logits if hasattr(out, "logits") else out


# ---- the spec ----------------------------------------------------------------------------------------
class ExportSpec:
    """One input kind of exported file. A subclass sets, in `__init__(model, example, axes)`:
    `inputs` (the traced example, in file order), `input_names`, `dynamic_axes` ({input name: {axis:
    dim name}}, from `axes`, the subset of `DYNAMIC_AXES` asked for), and where it differs from the
    defaults `output_names`, `derived_axes` (axes torch.export infers, e.g. 'past_seq + seq') and
    `max_seq` (the bound of the `seq` dim). It overrides `more_examples` (and `eager_module`,
    `arrange`, `metadata` when its module is not `FlatInputs`)."""

    name: ClassVar[str]                  # registry key, `export(spec=NAME)`, metadata `spec`
    kind: ClassVar[str] = "logits"       # what the file computes: metadata `kind`
    priority: ClassVar[int] = 0          # automatic choice tries higher first (the built-ins are < 0)
    inputs: tuple[torch.Tensor, ...]
    input_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]

    def __init__(self, model: nn.Module, example: tuple[torch.Tensor, ...], axes: set[str]):
        self.model = model
        self.output_names: list[str] = ["logits"]
        self.derived_axes: dict[str, dict[int, str]] = {}
        self.max_seq: int | None = None

    @classmethod
    def accepts(cls, model: nn.Module, example: tuple[Any, ...]) -> bool:
        """Whether an automatic choice takes this spec for `model` traced on `example`."""
        return False

    @classmethod
    def default_example(cls, model: nn.Module) -> tuple[torch.Tensor, ...]:
        """The example `export` traces with when the caller gives none."""
        return example_inputs(model)

    @classmethod
    def module_for(cls, model: nn.Module, input_names: Sequence[str]) -> nn.Module:
        """The module whose flat positional inputs are a file's inputs of this kind."""
        return FlatInputs(model, input_names)

    def example(self) -> tuple[torch.Tensor, ...]:
        return self.inputs

    def more_examples(self) -> list[tuple[torch.Tensor, ...]]:
        """Inputs at other sizes along the dynamic axes, for the check (none by default)."""
        return []

    def eager_module(self) -> nn.Module:
        return self.module_for(self.model, self.input_names)

    def arrange(self, per_input: list[Any]) -> tuple[Any, ...]:
        """Per-input dynamic shapes arranged like the module's forward signature (`*inputs`)."""
        return (tuple(per_input),)

    def metadata(self) -> dict[str, Any]:
        """What this kind adds to the file's metadata (on top of name, config, inputs, ...)."""
        return {"kind": self.kind, "spec": self.name}


# ---- registry ----------------------------------------------------------------------------------------
EXPORT_SPECS: dict[str, type[ExportSpec]] = {}


def register_export_spec(cls: type[ExportSpec]) -> type[ExportSpec]:
    """Register an input kind under `cls.name` (usable as a class decorator). Automatic choice tries
    higher `priority` first, then the newest registration: a new kind (priority 0) can claim inputs
    before the built-ins, whichever was imported first."""
    name = getattr(cls, "name", None)
    if not name:
        raise ConfigError(f"{cls.__name__} needs a `name` to be registered as an export spec")
    if name in EXPORT_SPECS and EXPORT_SPECS[name] is not cls:
        raise ConfigError(f"an export spec named {name!r} is already registered ({EXPORT_SPECS[name].__name__})")
    EXPORT_SPECS[name] = cls
    return cls
