"""Meta-device helpers shared by summary, flops and memory (below all three, so none imports another):
example inputs from a model's declaration (or its config), input normalisation, and running a
forward pass on storage-free copies of a model's weights."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from torchgraft.errors import TorchgraftError
from torchgraft.models.parts import parts_of

InputSpec = Any  # a tensor, a tuple of positional args, or a dict of keyword args


class InspectError(TorchgraftError, ValueError):
    """A model cannot be inspected as asked (no input given, forward fails on meta tensors, ...)."""


# --------------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------------
def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def example_inputs(model: nn.Module, batch: int = 1, seq_len: int | None = None,
                   device: str | torch.device = "meta") -> tuple[torch.Tensor, ...] | None:
    """Example positional inputs of `model` on `device`, or None when it describes none.

    A model that declares its parts (`parts_of`) gives them (`ModelParts.example_inputs`). Otherwise
    its `config` is read: token models (config with `vocab_size`) get `input_ids (batch, seq_len)`
    (default `block_size`); image models (config with `image_size` or `in_chans`) get
    `(batch, in_chans, size, size)` floats (size = `image_size`, or 224 for size-agnostic CNNs).
    """
    parts = parts_of(model)
    if parts is not None and parts.example_inputs is not None:
        return tuple(x.to(device) for x in parts.example_inputs(batch, seq_len))
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    if getattr(cfg, "vocab_size", None):
        t = seq_len or getattr(cfg, "block_size", None) or 128
        return (torch.zeros(batch, t, dtype=torch.long, device=device),)
    if getattr(cfg, "image_size", None) or getattr(cfg, "in_chans", None):
        size = getattr(cfg, "image_size", None) or 224  # size-agnostic CNNs (ResNet): ImageNet's 224
        hw = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        return (torch.zeros(batch, getattr(cfg, "in_chans", 3), *hw, device=device),)
    return None


def make_inputs(model: nn.Module, input: InputSpec = None, input_size: Any = None,
                dtype: torch.dtype | None = None, batch: int = 1, seq_len: int | None = None,
                required: bool = True) -> tuple[tuple, dict] | None:
    """Normalise the ways of giving an input into `(args, kwargs)` of meta tensors.

    `input`: a tensor, a tuple/list of args, or a dict of keyword args (real or meta tensors).
    `input_size`: a shape like `(1, 3, 32, 32)` or a list of shapes (float tensors of `dtype`,
    default float32; use `dtype=torch.long` for token ids). Neither: `example_inputs(model)`.
    """
    if input is not None:
        if isinstance(input, torch.Tensor):
            args, kwargs = (input,), {}
        elif isinstance(input, dict):
            args, kwargs = (), dict(input)
        elif isinstance(input, (tuple, list)):
            args, kwargs = tuple(input), {}
        else:
            raise InspectError(f"input must be a tensor, a tuple of tensors or a dict, got {type(input).__name__}")
    elif input_size is not None:
        sizes = list(input_size)
        if not sizes or all(isinstance(s, int) for s in sizes):
            sizes = [sizes]
        dt = dtype or torch.float32
        try:
            args = tuple(torch.zeros(tuple(s), dtype=dt, device="meta") for s in sizes)
        except TypeError:
            raise InspectError(f"input_size must be a shape like (1, 3, 32, 32) or a list of shapes, "
                               f"got {input_size!r}") from None
        kwargs = {}
    else:
        ex = example_inputs(model, batch=batch, seq_len=seq_len)
        if ex is None:
            if not required:
                return None
            raise InspectError(f"cannot guess an input for {type(model).__name__}: pass input=<tensor> "
                               "or input_size=(batch, ...) (e.g. input_size=(1, 3, 32, 32))")
        args, kwargs = ex, {}

    def to_meta(x: Any) -> Any:
        return x.to("meta") if isinstance(x, torch.Tensor) else x

    return tuple(to_meta(a) for a in args), {k: to_meta(v) for k, v in kwargs.items()}


def _meta_copy(t: torch.Tensor, dtype: torch.dtype | None, device: str = "meta") -> torch.Tensor:
    dt = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
    out = torch.empty(t.shape, dtype=dt, device=device)
    return out.requires_grad_(t.requires_grad) if out.is_floating_point() else out


def meta_state(model: nn.Module, dtype: torch.dtype | None = None, device: str = "meta"
               ) -> dict[str, torch.Tensor]:
    """Storage-free copies of every parameter and buffer (floating ones cast to `dtype` if given),
    keyed by name; tied parameters appear once (`functional_call` re-ties them)."""
    state = {name: _meta_copy(p, dtype, device) for name, p in model.named_parameters()}
    for name, b in model.named_buffers():
        state[name] = _meta_copy(b, dtype, device)
    return state


def run_on_meta(model: nn.Module, args: tuple, kwargs: dict, fn: Callable[[Callable[[], Any],
                dict[str, torch.Tensor]], Any], dtype: torch.dtype | None = None,
                fake_first: bool = False) -> Any:
    """Call `fn(forward, state)` where `forward()` runs `model` on storage-free copies of its weights.

    First on the meta device; if the forward pass refuses meta tensors (plain tensor attributes,
    `torch.autocast(device_type="meta")`, ...) again under `FakeTensorMode` with CPU fake tensors.
    `state` maps parameter/buffer names to the tensors `forward` uses (so `fn` can take gradients
    with respect to them). The model itself is never modified or moved. `fake_first`: skip the meta
    attempt, for when kernel choice matters (on meta, SDPA takes its math path and keeps the
    attention matrix; CPU fake tensors take the flash kernel, as real devices do).
    """
    def cast(x: Any, device: str) -> Any:
        if isinstance(x, torch.Tensor):
            dt = dtype if (dtype is not None and x.is_floating_point()) else x.dtype
            return torch.empty(x.shape, dtype=dt, device=device)
        return x

    def attempt(device: str) -> Any:
        state = meta_state(model, dtype, device)
        a = tuple(cast(x, device) for x in args)
        kw = {k: cast(v, device) for k, v in kwargs.items()}

        def forward() -> Any:
            return torch.func.functional_call(model, state, a, kw, strict=False)

        return fn(forward, state)

    if not fake_first:
        try:
            return attempt("meta")
        except InspectError:
            raise
        except Exception:  # noqa: BLE001 - retried with fake tensors below
            pass
    from torch._subclasses.fake_tensor import FakeTensorMode

    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            return attempt("cpu")
    except InspectError:
        raise
    except Exception as e:  # noqa: BLE001
        raise InspectError(f"{type(model).__name__}.forward failed on meta/fake tensors "
                           f"(check the input): {_one_line(e)}") from e


def _one_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


